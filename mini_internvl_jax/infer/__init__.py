"""Inference: KV-cache generation, sampling and benchmark scoring."""

from mini_internvl_jax.infer.generate import GenerationConfig, Generator, Prompt
from mini_internvl_jax.infer.sampling import SamplingConfig, sample_logits

__all__ = ["GenerationConfig", "Generator", "Prompt", "SamplingConfig", "sample_logits"]
