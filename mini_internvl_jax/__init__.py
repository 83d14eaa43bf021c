"""mini_internvl_jax: Mini-InternVL (InternVL2-1B/2B/4B) in JAX/Flax NNX."""

from mini_internvl_jax._version import __version__
from mini_internvl_jax.config import ComputeConfig, ModelConfig, load_model_config


def load_pretrained(path, compute=None, *, mesh=None, **kwargs):
    """Model from a training run, a converted folder or a Hugging Face InternVL folder under
    `compute` (a ComputeConfig; None keeps the stored dtype and layout); see checkpoints/resolve.py.
    Imported on first use so `import mini_internvl_jax` stays light (no torch/orbax)."""
    from mini_internvl_jax.checkpoints.resolve import load_pretrained as _load

    return _load(path, compute, mesh=mesh, **kwargs)


__all__ = ["ComputeConfig", "ModelConfig", "__version__", "load_model_config", "load_pretrained"]
