"""Training: sharded steps over device meshes, Orbax checkpoints, exact resume, TPU AOT."""

from mini_internvl_jax.train.cli import main

__all__ = ["main"]
