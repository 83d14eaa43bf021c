"""Converted Orbax folder (or a bare params checkpoint) -> Hugging Face safetensors folder.

With the converted folder's tokenizer files, the export also gets what a serving stack reads
(processor, chat template, generation config, token ids: `serving.py`).

Tensors are written in the mapping's order straight into (sharded) safetensors files, one at a
time, from parameters read in batches; by default each tensor gets the dtype it had in the
checkpoint originally converted, so HF -> Orbax -> HF reproduces the source bit for bit.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np
from etils import epath

from mini_internvl_jax.config import DTYPES, ModelConfig, load_model_config
from mini_internvl_jax.convert.errors import (
    CheckpointReadError,
    ConversionError,
    check_output,
)
from mini_internvl_jax.convert.hf_config import hf_config_from_model, read_json
from mini_internvl_jax.convert.hf_io import PlannedTensor, SafetensorsWriter, parse_size
from mini_internvl_jax.convert.importer import ConversionStats, OnTensor
from mini_internvl_jax.convert.mapping import (
    LAYOUTS,
    model_rules,
    native_saved_name,
    target_key,
)
from mini_internvl_jax.convert.orbax_io import (
    PARAMS_DIR,
    BatchedParams,
    copy_side_files,
    is_converted_folder,
    model_config_from_json,
    params_metadata,
    read_converted,
    write_json,
)
from mini_internvl_jax.convert.params import (
    check_against_specs,
    is_scanned,
    param_specs,
    stacks_of,
)
from mini_internvl_jax.convert.serving import write_serving_files
from mini_internvl_jax.data.tokenizer import find_tokenizer
from mini_internvl_jax.fileio import IncompleteFolderError, atomic_folder, local_copy

log = logging.getLogger(__name__)


def _source(src: Path, model_config: str | None) -> tuple[ModelConfig, dict, Path]:
    if is_converted_folder(src):
        cfg, info = read_converted(src)
        return cfg, info, src / PARAMS_DIR
    if model_config is None:
        raise CheckpointReadError(
            f"{src} is not a converted folder (model_config.json + {PARAMS_DIR}/); for a bare "
            "Orbax parameter checkpoint pass --model-config PRESET, YAML or model_config.json")
    if not (src / "_METADATA").is_file() and (src / PARAMS_DIR).is_dir():
        src = src / PARAMS_DIR
    if model_config.endswith(".json"):  # e.g. another converted folder's model_config.json
        cfg = model_config_from_json(read_json(Path(model_config), "the model config"),
                                     model_config)
    else:
        cfg = load_model_config(model_config)
    return cfg, {}, src


def _out_dtypes(names: list[str], stored: dict[str, np.dtype], dtype: str | None, info: dict
                ) -> dict[str, np.dtype]:
    if dtype not in (None, "auto"):
        if dtype not in DTYPES:
            raise ConversionError(f"dtype {dtype!r} is not one of {('auto',) + DTYPES}")
        return dict.fromkeys(names, jnp.dtype(dtype))
    main = info.get("source_dtype")
    exceptions = info.get("source_dtype_exceptions") or {}
    if main is None:
        return stored
    return {n: jnp.dtype(exceptions.get(n, main)) for n in names}


def export_to_hf(src_dir: str | Path, out_dir: str | Path, *, layout: str = "original",
                 dtype: str | None = "auto", max_shard_size: str | int = "5GB",
                 model_config: str | None = None, overwrite: bool = False,
                 on_tensor: OnTensor | None = None, read_batch_bytes: int = 256 * 2**20
                 ) -> ConversionStats:
    """Writes config.json + safetensors (+ index when sharded) + tokenizer files to `out_dir`.

    Peak memory is about `read_batch_bytes` plus one tensor (more when the stored layers are
    stacked: a stacked parameter stays loaded until its last layer is written).
    """
    start = time.perf_counter()
    if layout not in LAYOUTS:
        raise ConversionError(f"layout {layout!r} is not one of {LAYOUTS}")
    check_output(out_dir, overwrite)
    if not epath.Path(src_dir).is_dir():
        raise CheckpointReadError(f"Orbax folder {src_dir} does not exist")
    try:
        src_dir = local_copy(src_dir)
    except IncompleteFolderError as e:
        raise CheckpointReadError(str(e)) from None
    max_bytes = parse_size(max_shard_size)
    cfg, info, params_dir = _source(src_dir, model_config)
    meta = params_metadata(params_dir)
    scan = is_scanned(meta, stacks_of(cfg))
    check_against_specs({p: s for p, (s, _) in meta.items()}, param_specs(cfg, scan=scan),
                        str(params_dir))
    rules = model_rules(cfg, layout)
    stored = {}
    for rule in rules:
        first = meta[target_key(rule.targets[0], scan)[0]][1]
        stored.update(dict.fromkeys(rule.sources, first))
    names = [n for r in rules for n in r.sources]
    out_dtypes = _out_dtypes(names, stored, dtype, info)
    file_name = {n: n for n in names}
    if layout == "native" and info.get("native_saved_names", True):
        file_name = {n: native_saved_name(n) for n in names}
    plan = [PlannedTensor(file_name[n], out_dtypes[n], s) for r in rules
            for n, s in zip(r.sources, r.source_shapes, strict=True)]
    config_dtype = Counter(out_dtypes[n].name for n in names).most_common(1)[0][0]
    if layout == "native" and cfg.llm.family == "phi3":
        log.warning("Phi-3 in transformers' native InternVL layout loads with the transformers "
                    "version tested here (5.24), but upstream's converter excludes it and older "
                    "versions reject its rope settings; the original layout is what the "
                    "InternVL2-4B release uses")
    hf_config = hf_config_from_model(cfg, layout, config_dtype, base=info.get("source_config"))

    keys = [[target_key(t, scan) for t in rule.targets] for rule in rules]
    params = BatchedParams(params_dir, meta, [[p for p, _ in step] for step in keys],
                           read_batch_bytes)
    stats = ConversionStats()
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        writer = SafetensorsWriter(tmp, plan, max_bytes)
        try:
            for step, rule in enumerate(rules):
                values = [params.get(p) if layer is None else params.get(p)[layer]
                          for p, layer in keys[step]]
                for name, array in zip(rule.sources, rule.to_hf(values), strict=True):
                    array = np.asarray(array).astype(out_dtypes[name], copy=False)
                    writer.write(file_name[name], array)
                    stats.tensors += 1
                    stats.parameters += array.size
                    stats.bytes += array.nbytes
                    if on_tensor is not None:
                        on_tensor(name, stats.tensors, len(plan))
                del values
                params.done(step)
        except BaseException:
            writer.abort()
            raise
        writer.close()
        write_json(tmp / "config.json", hf_config)
        if is_converted_folder(src_dir):
            copy_side_files(src_dir, tmp)
        if find_tokenizer(tmp) is not None:
            write_serving_files(tmp, cfg, layout)
        else:
            log.warning("%s holds no tokenizer files: the export has weights and config.json "
                        "only (no processor, chat template or generation config)", src_dir)
    stats.seconds = time.perf_counter() - start
    return stats
