"""Training: sharded steps over device meshes, Orbax checkpoints, exact resume, TPU AOT.

The command line is `mivl-train` (mini_internvl_jax/cli/train.py).
"""
