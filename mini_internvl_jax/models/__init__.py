"""Flax NNX models: InternViT, the LLM decoder and the InternVL glue."""

from mini_internvl_jax.models.internvl import InternVLModel, pixel_shuffle
from mini_internvl_jax.models.llm import Decoder, KVCache, ModelOutput
from mini_internvl_jax.models.vision import InternViT

__all__ = ["Decoder", "InternVLModel", "InternViT", "KVCache", "ModelOutput", "pixel_shuffle"]
