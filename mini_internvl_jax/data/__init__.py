"""Data pipeline: InternVL-format sources, exact dynamic tiling, chat templates, packing, Grain.

Modules, in pipeline order: `sources` (meta JSON + JSONL, ArrayRecord, TFDS), `tiling`,
`tokenizer`, `templates`, `processing` (record -> sample; inference prompts), `packing`,
`pipeline` (the Grain iterator), `config` (`DataConfig`) and `demo` (synthetic data).
"""

from mini_internvl_jax.data.config import DataConfig, data_config_from_dict
from mini_internvl_jax.data.errors import DataError, TokenizerError
from mini_internvl_jax.data.packing import STATS_KEYS
from mini_internvl_jax.data.pipeline import (
    build_train_dataset,
    build_train_iterator,
    get_iterator_state,
    set_iterator_state,
)
from mini_internvl_jax.data.processing import PromptInputs, prepare_chat_inputs
from mini_internvl_jax.data.templates import get_template, stop_token_ids
from mini_internvl_jax.data.tokenizer import Tokenizer, load_tokenizer

__all__ = [
    "STATS_KEYS",
    "DataConfig",
    "DataError",
    "PromptInputs",
    "Tokenizer",
    "TokenizerError",
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
