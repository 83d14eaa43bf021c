"""Attention: the mask, the dense reference, Pallas flash kernels (TPU: Mosaic, GPU: Triton)
and the dispatch between them."""

from mini_internvl_jax.kernels.dispatch import attention, resolve_impl, sharded, target_platform
from mini_internvl_jax.kernels.reference import AttentionMask, dot_product_attention

__all__ = ["AttentionMask", "attention", "dot_product_attention", "resolve_impl", "sharded",
           "target_platform"]
