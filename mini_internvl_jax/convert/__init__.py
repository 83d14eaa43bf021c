"""Hugging Face PyTorch checkpoints <-> our parameter tree (mapping) and Orbax (converter).

Public entry points: `convert_hf_to_orbax`, `export_to_hf`, `open_source` (any model folder:
training run, converted, Hugging Face), `load_pretrained`, `load_pretrained_with_info`; the CLI
is `mivl-convert` (cli/convert.py).
"""

from mini_internvl_jax.convert.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
    ConversionError,
    UnknownArchitectureError,
)
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.convert.importer import ConversionStats, convert_hf_to_orbax
from mini_internvl_jax.convert.resolve import (
    Source,
    load_pretrained,
    load_pretrained_with_info,
    open_source,
)

__all__ = ["CheckpointMismatchError", "CheckpointReadError", "ConversionError",
           "ConversionStats", "Source", "UnknownArchitectureError",
           "convert_hf_to_orbax", "export_to_hf", "load_pretrained",
           "load_pretrained_with_info", "open_source"]
