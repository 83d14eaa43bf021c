"""Pallas flash-attention kernels (TPU: Mosaic, GPU: Triton) and the dispatch between them."""

from mini_internvl_jax.kernels.dispatch import attention, resolve_impl, sharded, target_platform

__all__ = ["attention", "resolve_impl", "sharded", "target_platform"]
