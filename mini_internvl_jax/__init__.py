"""mini_internvl_jax: Mini-InternVL (InternVL2-1B/2B/4B) in JAX/Flax NNX."""

from mini_internvl_jax.config import ModelConfig, load_model_config

__version__ = "0.1.0"


def load_pretrained(path, dtype=None, *, mesh=None, **kwargs):
    """Model from a converted folder or a Hugging Face InternVL folder (see convert/)."""
    from mini_internvl_jax.convert.load import load_pretrained as _load

    return _load(path, dtype=dtype, mesh=mesh, **kwargs)


__all__ = ["ModelConfig", "load_model_config", "load_pretrained"]
