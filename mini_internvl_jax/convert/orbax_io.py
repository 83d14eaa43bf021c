"""The converted folder: `params/` (Orbax), `model_config.json`, `conversion.json`, tokenizer.

Parameters are saved from host numpy arrays with Orbax's NumpyHandler told not to deep-copy them
and without zstd compression: the default copy doubles peak memory, and compression buffered the
compressed bytes of every array at once (+0.75x the checkpoint on InternVL2-1B, for a file only
25% smaller; see benchmarks/convert.py). Restores go to host numpy or straight onto devices.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from mini_internvl_jax import configlib
from mini_internvl_jax.config import ModelConfig, model_config_from_dict, split_legacy_compute
from mini_internvl_jax.convert.errors import CheckpointReadError
from mini_internvl_jax.convert.params import flatten, nest
from mini_internvl_jax.errors import quiet_storage_failures, silence_abandoned_reads

PARAMS_DIR = "params"
MODEL_CONFIG = "model_config.json"
CONVERSION_INFO = "conversion.json"
# Copied next to the weights so a converted folder is self-contained (tokenizer, chat settings,
# and remote code such as tokenization_internlm2.py); `*.py` files are copied as well.
SIDE_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json",
              "special_tokens_map.json", "added_tokens.json", "vocab.json", "merges.txt",
              "generation_config.json", "preprocessor_config.json", "processor_config.json",
              "chat_template.json", "chat_template.jinja")


def side_files(folder: str | os.PathLike) -> list[epath.Path]:
    """The tokenizer / chat / remote-code files in `folder` (local or on a store)."""
    root = epath.Path(folder)
    return [root / n for n in SIDE_FILES if (root / n).is_file()] + \
        sorted((p for p in root.glob("*.py") if p.is_file()), key=str)


def copy_side_files(src: str | os.PathLike, dst: Path) -> list[str]:
    copied = []
    for f in side_files(src):
        (Path(dst) / f.name).write_bytes(f.read_bytes())
        copied.append(f.name)
    return copied


def _no_copy_checkpointer() -> ocp.Checkpointer:
    registry = ocp.type_handlers.create_type_handler_registry(
        (np.ndarray, ocp.type_handlers.NumpyHandler(deepcopy_host_arrays=False)),
        (jax.Array, ocp.type_handlers.ArrayHandler()))
    return ocp.Checkpointer(ocp.PyTreeCheckpointHandler(type_handler_registry=registry,
                                                        use_compression=False))


def save_params(path: Path, flat: dict[tuple, np.ndarray]) -> None:
    """Writes host arrays as an Orbax PyTree checkpoint (nested dicts of our state paths)."""
    quiet_storage_failures()  # a full disk is reported by the caller in one line
    with _no_copy_checkpointer() as ckptr:
        ckptr.save(Path(path).absolute(), args=ocp.args.PyTreeSave(nest(flat)))


def params_metadata(path: Path) -> dict[tuple, tuple[tuple[int, ...], np.dtype]]:
    """{state path: (shape, dtype)} without reading any array."""
    return {p: (tuple(m.shape), np.dtype(m.dtype))
            for p, m in flatten(_metadata_tree(Path(path).absolute())).items()}


def _map_leaves(tree: dict, fn) -> dict:
    return {k: _map_leaves(v, fn) if isinstance(v, dict) else fn(v) for k, v in tree.items()}


def _metadata_tree(path: Path) -> dict:
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            meta = ckptr.metadata(path)
            tree = getattr(meta, "item_metadata", meta)
            tree = getattr(tree, "tree", tree)
            if not isinstance(tree, dict):
                raise CheckpointReadError(f"{path} does not hold a tree of named arrays (a "
                                          "damaged or incomplete checkpoint?)")
    except CheckpointReadError:
        silence_abandoned_reads()
        raise
    except Exception as e:  # orbax/tensorstore raise many types for missing or corrupt data
        silence_abandoned_reads()
        raise CheckpointReadError(f"cannot read the Orbax checkpoint {path}: {e}") from None
    return tree


def restore_numpy(path: Path, dtype=None, only: list[tuple] | None = None
                  ) -> dict[tuple, np.ndarray]:
    """Parameters as host numpy arrays (optionally cast while reading); `only` some of them."""
    path = Path(path).absolute()
    if only is None:
        tree = _metadata_tree(path)
    else:  # Orbax stores every key as a string
        tree = nest({tuple(str(k) for k in p): 0 for p in only})
    args = _map_leaves(tree, lambda _: ocp.RestoreArgs(restore_type=np.ndarray, dtype=dtype))
    restore = ocp.args.PyTreeRestore(restore_args=args) if only is None else \
        ocp.args.PyTreeRestore(item=tree, restore_args=args, partial_restore=True)
    try:
        with ocp.Checkpointer(ocp.PyTreeCheckpointHandler()) as ckptr:
            return flatten(ckptr.restore(path, args=restore))
    except Exception as e:
        silence_abandoned_reads()
        raise CheckpointReadError(f"cannot restore the Orbax checkpoint {path}: {e}") from None


class BatchedParams:
    """Stored parameters fetched in first-use order, a batch of at most `batch_bytes` per read,
    and dropped after their last use: export memory stays near one batch, not the whole tree."""

    def __init__(self, path: Path, meta: dict, uses: list[list[tuple]],
                 batch_bytes: int = 256 * 2**20):
        self.path, self.meta, self.batch_bytes = path, meta, batch_bytes
        self.last_use = {p: i for i, step in enumerate(uses) for p in step}
        self.order = list(dict.fromkeys(p for step in uses for p in step))
        self.position = {p: i for i, p in enumerate(self.order)}
        self.loaded: dict[tuple, np.ndarray] = {}

    def _nbytes(self, p: tuple) -> int:
        shape, dtype = self.meta[p]
        return int(np.prod(shape)) * dtype.itemsize

    def get(self, p: tuple) -> np.ndarray:
        if p not in self.loaded:
            batch: list[tuple] = []
            size = 0
            for q in self.order[self.position[p]:]:
                if batch and size + self._nbytes(q) > self.batch_bytes:
                    break
                if q not in self.loaded:
                    batch.append(q)
                    size += self._nbytes(q)
            self.loaded.update(restore_numpy(self.path, only=batch))
        return self.loaded[p]

    def done(self, step: int) -> None:
        """Forgets every parameter whose last use was `step`."""
        for p in [p for p in self.loaded if self.last_use[p] <= step]:
            del self.loaded[p]


def restore_placed(path: Path, specs: dict[tuple, jax.ShapeDtypeStruct]) -> dict[tuple, jax.Array]:
    """Parameters restored straight onto each spec's sharding and dtype."""
    path = Path(path).absolute()
    try:
        with ocp.StandardCheckpointer() as ckptr:
            tree = ckptr.restore(path, nest(specs))
    except Exception as e:
        silence_abandoned_reads()
        raise CheckpointReadError(f"cannot restore the Orbax checkpoint {path}: {e}") from None
    return flatten(tree)


def write_json(path: Path, data: dict) -> None:
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def write_model_config(folder: Path, cfg: ModelConfig) -> None:
    """Architecture only: how to run the model (dtypes, scan, ...) is the reader's choice."""
    write_json(Path(folder) / MODEL_CONFIG, configlib.to_dict(cfg))


def model_config_from_json(data: dict, where: str | Path) -> ModelConfig:
    """A stored model config; run-time keys an older version wrote are dropped (with a notice)."""
    return model_config_from_dict(split_legacy_compute(data, str(where))[0])


def is_converted_folder(path: Path) -> bool:
    path = Path(path)
    return (path / MODEL_CONFIG).is_file() and (path / PARAMS_DIR).is_dir()


def read_converted(folder: Path) -> tuple[ModelConfig, dict]:
    """(model config, conversion info or {}) of a converted folder."""
    folder = Path(folder)
    try:
        data = json.loads((folder / MODEL_CONFIG).read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointReadError(f"cannot read {folder / MODEL_CONFIG}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointReadError(f"{folder / MODEL_CONFIG} must hold a JSON object")
    cfg = model_config_from_json(data, folder / MODEL_CONFIG)
    info = {}
    if (folder / CONVERSION_INFO).is_file():
        try:
            info = json.loads((folder / CONVERSION_INFO).read_text())
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise CheckpointReadError(f"cannot read {folder / CONVERSION_INFO}: {e}") from None
    return cfg, info
