"""Data pipeline: InternVL-format sources, exact dynamic tiling, chat templates, packing, Grain.

Modules, in pipeline order: `sources` (meta JSON + JSONL, ArrayRecord, TFDS), `tiling`,
`tokenizer`, `templates`, `media` + `video` (several images, video frames), `processing`
(record -> sample; inference prompts), `packing`, `pipeline` (the Grain iterator), `config`
(`DataConfig`) and `demo` (synthetic data); beside the pipeline, `shards` (JSONL + images ->
ArrayRecord shards) and `validate` (what a run would reject).
"""

import importlib

from mini_internvl_jax.data.config import DataConfig, data_config_from_dict
from mini_internvl_jax.data.errors import DataError, TokenizerError
from mini_internvl_jax.data.processing import PromptInputs, prepare_chat_inputs
from mini_internvl_jax.data.templates import get_template, stop_token_ids
from mini_internvl_jax.data.tokenizer import Tokenizer, load_tokenizer
from mini_internvl_jax.data.video import VideoRef

# Grain is imported only when the pipeline is used, so configs, tokenizers and templates work
# on machines without it (inference hosts, accelerator images).
_LAZY = {"STATS_KEYS": "packing", "build_train_dataset": "pipeline",
         "build_train_iterator": "pipeline", "get_iterator_state": "pipeline",
         "set_iterator_state": "pipeline"}


def __getattr__(name):
    if name in _LAZY:
        return getattr(importlib.import_module(f"mini_internvl_jax.data.{_LAZY[name]}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "STATS_KEYS",
    "DataConfig",
    "DataError",
    "PromptInputs",
    "Tokenizer",
    "TokenizerError",
    "VideoRef",
    "build_train_dataset",
    "build_train_iterator",
    "data_config_from_dict",
    "get_iterator_state",
    "get_template",
    "load_tokenizer",
    "prepare_chat_inputs",
    "set_iterator_state",
    "stop_token_ids",
]
