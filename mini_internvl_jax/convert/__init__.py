"""Hugging Face PyTorch checkpoints <-> our parameter tree (mapping) and converted folders.

Public entry points: `convert_hf_to_orbax`, `export_to_hf`; the CLI is `mivl-convert`
(cli/convert.py). Opening any model folder (`open_source`, `load_pretrained`) lives one layer up,
in `checkpoints/`.
"""

from mini_internvl_jax.convert.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
    ConversionError,
    UnknownArchitectureError,
)
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.convert.importer import ConversionStats, convert_hf_to_orbax

__all__ = ["CheckpointMismatchError", "CheckpointReadError", "ConversionError",
           "ConversionStats", "UnknownArchitectureError", "convert_hf_to_orbax", "export_to_hf"]
