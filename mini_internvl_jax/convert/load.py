"""A model from a converted folder or straight from a Hugging Face folder, under a given
ComputeConfig (checkpoints/resolve.py picks the loader for a folder).

With a mesh, parameters go directly to their `sharding.state_shardings` places: Orbax reads each
device's slice itself (concrete NamedShardings, never the AbstractMesh of `nnx.eval_shape`), and
an in-memory HF conversion is placed tensor by tensor.
"""

from __future__ import annotations

import math
from collections import Counter
from pathlib import Path
from typing import cast

import jax
from jax.sharding import Mesh

from mini_internvl_jax.config import DTYPES, ComputeConfig, Dtype
from mini_internvl_jax.convert.errors import CheckpointMismatchError
from mini_internvl_jax.convert.finite import check_finite_arrays
from mini_internvl_jax.convert.importer import HFSource, hf_to_arrays
from mini_internvl_jax.convert.orbax_io import (
    PARAMS_DIR,
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
    path_str,
    restack,
    shardings,
    stacks_of,
)
from mini_internvl_jax.models import InternVLModel


def _place(host: dict, where: dict) -> dict:
    """Host arrays -> arrays on `where`'s shardings; each process fills only its own devices."""
    out = {}
    for p in list(host):
        a = host.pop(p)
        out[p] = jax.make_array_from_callback(a.shape, where[p], a.__getitem__)
    return out


def stored_compute(path: Path) -> ComputeConfig:
    """How a converted folder stores its weights: their dtype (which it also computes in unless
    told otherwise) and whether the layers are stacked."""
    stored_cfg, _ = read_converted(path)
    meta = params_metadata(path / PARAMS_DIR)
    counts: Counter[str] = Counter()
    for shape, stored in meta.values():
        counts[stored.name] += math.prod(shape)
    main = counts.most_common(1)[0][0] if counts else "float32"
    dtype = cast(Dtype, main if main in DTYPES else "float32")
    return ComputeConfig(dtype=dtype, param_dtype=dtype,
                         scan_layers=is_scanned(meta, stacks_of(stored_cfg)))


def load_converted(path: Path, compute: ComputeConfig, *, mesh: Mesh | None = None
                   ) -> InternVLModel:
    """A converted folder's model under `compute`; stacked and per-layer storage load either
    way (restacked on the host when the layouts differ)."""
    cfg, _ = read_converted(path)
    params_dir = path / PARAMS_DIR
    meta = params_metadata(params_dir)
    integer = [f"{path_str(p)} ({d.name})" for p, (_, d) in meta.items() if d.kind in "biu"]
    if integer:  # a cast to float would hide a wrongly written checkpoint
        raise CheckpointMismatchError(f"{params_dir}: parameter(s) {', '.join(integer[:6])} "
                                      "hold integers; parameters are floating point")
    stacks = stacks_of(cfg)
    graphdef, state = abstract_model(cfg, compute)
    specs = flat_specs(state)
    where = shardings(state, mesh)
    if compute.scan_layers == is_scanned(meta, stacks):
        check_against_specs({p: s for p, (s, _) in meta.items()}, specs, str(params_dir))
        arrays = restore_placed(params_dir, {
            p: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=where[p])
            for p, s in specs.items()})
    else:
        host = restack(restore_numpy(params_dir, dtype=compute.param_dtype), stacks,
                       compute.scan_layers)
        check_against_specs({p: a.shape for p, a in host.items()}, specs, str(params_dir))
        arrays = _place(host, where)
    check_finite_arrays(arrays, str(params_dir))
    return build_model(graphdef, state, arrays)


def load_hf(src: HFSource, compute: ComputeConfig, *, mesh: Mesh | None = None,
            strict: bool = True) -> InternVLModel:
    """A Hugging Face folder's model under `compute`, converted in memory tensor by tensor.
    `strict` as in convert_weights.py: unexpected tensors are an error."""
    host, _ = hf_to_arrays(src, dtype=compute.param_dtype, scan=compute.scan_layers,
                           strict=strict)
    graphdef, state = abstract_model(src.info.config, compute)
    return build_model(graphdef, state, _place(host, shardings(state, mesh)))


__all__ = ["load_converted", "load_hf", "stored_compute"]
