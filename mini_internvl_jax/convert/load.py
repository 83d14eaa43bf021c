"""`load_pretrained`: a model from a converted folder or straight from a Hugging Face folder.

With a mesh, parameters go directly to their `sharding.state_shardings` places: Orbax reads each
device's slice itself (concrete NamedShardings, never the AbstractMesh of `nnx.eval_shape`), and
an in-memory HF conversion is placed tensor by tensor.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import jax
from jax.sharding import Mesh

from mini_internvl_jax.config import ModelConfig
from mini_internvl_jax.convert.errors import CheckpointReadError
from mini_internvl_jax.convert.finite import check_finite_arrays
from mini_internvl_jax.convert.importer import hf_to_arrays, open_hf, resolve_dtype
from mini_internvl_jax.convert.orbax_io import (
    PARAMS_DIR,
    is_converted_folder,
    params_metadata,
    read_converted,
    restore_numpy,
    restore_placed,
)
from mini_internvl_jax.convert.params import (
    abstract_model,
    build_model,
    check_against_specs,
    flat_specs,
    is_scanned,
    restack,
    shardings,
    stacks_of,
)
from mini_internvl_jax.data.tokenizer import find_tokenizer


@dataclass(frozen=True)
class PretrainedInfo:
    """What chat, eval and training scripts need next to the weights."""

    path: Path
    config: ModelConfig
    source: str                 # "converted" or "huggingface"
    layout: str | None          # HF layout of the source checkpoint, when known
    template: str               # conversation template name (data/templates)
    image_token_id: int         # <IMG_CONTEXT>
    tokenizer_dir: Path | None  # folder holding the tokenizer files, if any were found


def _configure(cfg: ModelConfig, dtype, compute_dtype, scan_layers, attention_impl, remat
               ) -> ModelConfig:
    changes = {}
    if dtype is not None:
        changes["param_dtype"] = changes["dtype"] = dtype
    if compute_dtype is not None:
        changes["dtype"] = compute_dtype
    for key, value in (("scan_layers", scan_layers), ("attention_impl", attention_impl),
                       ("remat", remat)):
        if value is not None:
            changes[key] = value
    return cfg.replace(**changes)


def _place(host: dict, where: dict) -> dict:
    """Host arrays -> arrays on `where`'s shardings; each process fills only its own devices."""
    out = {}
    for p in list(host):
        a = host.pop(p)
        out[p] = jax.make_array_from_callback(a.shape, where[p], lambda idx, a=a: a[idx])
    return out


def load_pretrained_with_info(path: str | Path, dtype: str | None = None, *,
                              mesh: Mesh | None = None, scan_layers: bool | None = None,
                              attention_impl: str | None = None,
                              compute_dtype: str | None = None, remat: str | None = None,
                              strict: bool = True, overrides: list[str] | tuple[str, ...] = ()):
    """(InternVLModel, PretrainedInfo) from a converted folder or a Hugging Face folder.

    `dtype` sets the parameter dtype (and the compute dtype unless `compute_dtype` is given);
    None keeps what the folder stores. `scan_layers`, `attention_impl` and `remat` override the
    stored model config; stacked and per-layer checkpoints load either way. `overrides`
    (`key=value`) and `strict` apply to Hugging Face folders, as in convert_weights.py.
    """
    path = Path(path)
    if is_converted_folder(path):
        stored_cfg, conv = read_converted(path)
        params_dir = path / PARAMS_DIR
        meta = params_metadata(params_dir)
        stacks = stacks_of(stored_cfg)
        cfg = _configure(stored_cfg.replace(scan_layers=is_scanned(meta, stacks)), dtype,
                         compute_dtype, scan_layers, attention_impl, remat)
        graphdef, state = abstract_model(cfg)
        specs = flat_specs(state)
        where = shardings(state, mesh)
        if cfg.scan_layers == is_scanned(meta, stacks):
            check_against_specs({p: s for p, (s, _) in meta.items()}, specs, str(params_dir))
            arrays = restore_placed(params_dir, {
                p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where[p])
                for p, s in specs.items()})
        else:
            host = restack(restore_numpy(params_dir, dtype=cfg.param_dtype), stacks,
                           cfg.scan_layers)
            check_against_specs({p: a.shape for p, a in host.items()}, specs, str(params_dir))
            arrays = _place(host, where)
        check_finite_arrays(arrays, str(params_dir))
        source, layout = "converted", conv.get("layout")
    elif (path / "config.json").is_file():
        src = open_hf(path, overrides)
        cfg = _configure(src.info.config, resolve_dtype(dtype, src.reader), compute_dtype,
                         scan_layers, attention_impl, remat)
        host, _ = hf_to_arrays(src, dtype=cfg.param_dtype, scan=cfg.scan_layers, strict=strict)
        graphdef, state = abstract_model(cfg)
        arrays = _place(host, shardings(state, mesh))
        source, layout = "huggingface", src.info.layout
    else:
        raise CheckpointReadError(
            f"{path} is neither a converted folder (model_config.json + {PARAMS_DIR}/) nor a "
            "Hugging Face folder (config.json + weights)")
    has_tokenizer = find_tokenizer(path) is not None
    info = PretrainedInfo(path, cfg, source, layout, cfg.template, cfg.image_token_id,
                          path if has_tokenizer else None)
    return build_model(graphdef, state, arrays), info


def load_pretrained(path: str | Path, dtype: str | None = None, *, mesh: Mesh | None = None,
                    **kwargs):
    """InternVLModel from a converted or Hugging Face folder; see load_pretrained_with_info."""
    return load_pretrained_with_info(path, dtype, mesh=mesh, **kwargs)[0]


__all__ = ["PretrainedInfo", "load_pretrained", "load_pretrained_with_info"]
