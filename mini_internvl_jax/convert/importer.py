"""Hugging Face InternVL folder -> our parameter tree (streaming) -> a converted Orbax folder.

Memory: the output arrays are allocated lazily from the `nnx.eval_shape` tree (never a real init)
and filled rule by rule while each source tensor is read on its own; rules run largest first, so
the extra memory at the end, when the output is complete, is one small tensor.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from etils import epath

from mini_internvl_jax._version import __version__
from mini_internvl_jax.config import DTYPES, Dtype, is_dtype
from mini_internvl_jax.convert.apply import fill_from_rules
from mini_internvl_jax.convert.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
    ConversionError,
    check_output,
    name_list,
)
from mini_internvl_jax.convert.finite import NonFiniteWeightsError, count_nonfinite, describe
from mini_internvl_jax.convert.hf_config import (
    HFModelInfo,
    detect_layout,
    model_config_from_hf,
    read_json,
)
from mini_internvl_jax.convert.hf_io import (
    CheckpointReader,
    RenamedReader,
    open_checkpoint,
)
from mini_internvl_jax.convert.mapping import Rule, model_rules, native_module_name, target_key
from mini_internvl_jax.convert.orbax_io import (
    CONVERSION_INFO,
    PARAMS_DIR,
    copy_side_files,
    save_params,
    write_json,
    write_model_config,
)
from mini_internvl_jax.convert.params import param_specs, path_str
from mini_internvl_jax.fileio import IncompleteFolderError, atomic_folder, is_remote, local_copy

# Buffers some PyTorch checkpoints carry that are recomputed, never learned.
IGNORABLE_SUFFIXES = (".rotary_emb.inv_freq",)
OnTensor = Callable[[str, int, int], None]  # (tensor name, index, total)


@dataclass
class ConversionStats:
    tensors: int = 0
    parameters: int = 0
    bytes: int = 0
    seconds: float = 0.0
    ignored: list[str] = field(default_factory=list)

    def summary(self, verb: str = "converted") -> str:
        line = (f"{verb} {self.tensors} tensors, {self.parameters:,} parameters, "
                f"{self.bytes / 1e9:.3f} GB in {self.seconds:.1f} s")
        if self.ignored:
            line += f"; ignored {len(self.ignored)} unexpected tensor(s)"
        return line


@dataclass(frozen=True)
class HFSource:
    folder: Path
    hf_config: dict
    reader: CheckpointReader
    info: HFModelInfo


def open_hf(folder: str | Path, overrides: list[str] | tuple[str, ...] = ()) -> HFSource:
    """Reads config.json and the checkpoint's tensor headers (no tensor data)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CheckpointReadError(f"Hugging Face folder {folder} does not exist")
    hf = read_json(folder / "config.json", "the model's config.json")
    reader = open_checkpoint(folder)
    if detect_layout(hf, str(folder / "config.json")) == "native":
        reader = RenamedReader(reader, native_module_name)
    info = model_config_from_hf(hf, lambda n: reader.shape(n) if n in reader else None, folder,
                                overrides)
    return HFSource(folder, hf, reader, info)


def source_dtypes(reader: CheckpointReader) -> tuple[str, dict[str, str]]:
    """(dtype of most bytes, {tensor: dtype} for the tensors that differ from it)."""
    weights: Counter[str] = Counter()
    for name in reader.names:
        weights[reader.dtype(name).name] += math.prod(reader.shape(name))
    main = weights.most_common(1)[0][0] if weights else "float32"
    return main, {n: reader.dtype(n).name for n in reader.names if reader.dtype(n).name != main}


def resolve_dtype(dtype: str | None, reader: CheckpointReader) -> Dtype:
    """`auto`/None keeps the checkpoint's own floating dtype."""
    if dtype in (None, "auto"):
        main, _ = source_dtypes(reader)
        return main if is_dtype(main) else "float32"
    if not is_dtype(dtype):
        raise ConversionError(f"dtype {dtype!r} is not one of {('auto',) + DTYPES}")
    return dtype


def check_tensors(reader: CheckpointReader, rules: list[Rule], strict: bool) -> list[str]:
    """Names and shapes against the rules before any data is read; returns ignored names."""
    expected = {n: s for r in rules for n, s in zip(r.sources, r.source_shapes, strict=True)}
    missing = [n for n in expected if n not in reader]
    if missing:
        raise CheckpointMismatchError(f"{reader.description} is missing {len(missing)} "
                                      f"tensor(s) the model needs: {name_list(missing)}")
    wrong = [f"{n!r} has shape {reader.shape(n)}, expected {s}"
             for n, s in expected.items() if reader.shape(n) != s]
    if wrong:
        raise CheckpointMismatchError(f"{reader.description}: tensor {wrong[0]}"
                                      + (f" (and {len(wrong) - 1} more)" if len(wrong) > 1
                                         else "") + "; does config.json match the weights?")
    unexpected = [n for n in reader.names if n not in expected]
    serious = [n for n in unexpected if not n.endswith(IGNORABLE_SUFFIXES)]
    if serious and strict:
        raise CheckpointMismatchError(
            f"{reader.description} has {len(serious)} unexpected tensor(s) the model does not "
            f"use: {name_list(serious)}; pass --no-strict to convert anyway and ignore them")
    return unexpected


def hf_to_arrays(src: HFSource, *, dtype: Dtype, scan: bool = False, strict: bool = True,
                 on_tensor: OnTensor | None = None
                 ) -> tuple[dict[tuple, np.ndarray], ConversionStats]:
    """Our parameters as host arrays of `dtype`, read tensor by tensor from `src`."""
    start = time.perf_counter()
    cfg = src.info.config
    rules = model_rules(cfg, src.info.layout)
    stats = ConversionStats(ignored=check_tensors(src.reader, rules, strict))
    specs = param_specs(cfg, dtype=dtype, scan=scan)
    covered = {target_key(t, scan)[0] for r in rules for t in r.targets}
    unfilled = [path_str(p) for p in specs if p not in covered]
    if unfilled:
        raise CheckpointMismatchError(f"no checkpoint tensor fills parameter(s) "
                                      f"{name_list(unfilled)}")
    total = sum(len(r.sources) for r in rules)
    integer = [f"{n} ({src.reader.dtype(n).name})" for r in rules for n in r.sources
               if src.reader.dtype(n).kind in "biu"]
    if integer:  # a cast to float would hide a wrong file or a quantized checkpoint
        raise CheckpointMismatchError(
            f"tensor(s) {name_list(integer)} of {src.reader.description} hold integers; the "
            "model's parameters are floating point (a quantized or wrongly saved checkpoint?)")

    def nbytes(rule: Rule) -> int:
        return sum(math.prod(src.reader.shape(n)) * src.reader.dtype(n).itemsize
                   for n in rule.sources)

    nonfinite: list[tuple[str, int, int]] = []

    def read(name: str) -> np.ndarray:
        array = src.reader.read(name)
        nan, inf = count_nonfinite(array)
        if nan or inf:
            nonfinite.append((name, nan, inf))
        stats.tensors += 1
        stats.parameters += array.size
        stats.bytes += array.nbytes
        if on_tensor is not None:
            on_tensor(name, stats.tensors, total)
        return array

    out = fill_from_rules(sorted(rules, key=nbytes, reverse=True), read, specs, scan=scan)
    if nonfinite:
        raise NonFiniteWeightsError(describe(sorted(nonfinite), src.reader.description))
    stats.seconds = time.perf_counter() - start
    return out, stats


def _saved_names(reader: CheckpointReader) -> bool | None:
    """Native checkpoints: whether the files used transformers' saved (Llava-style) names."""
    if not isinstance(reader, RenamedReader):
        return None
    return any(k != v for k, v in reader.original.items())


def convert_hf_to_orbax(hf_dir: str | Path, out_dir: str | Path, *, dtype: str | None = "auto",
                        scan_layers: bool = False, strict: bool = True,
                        overrides: list[str] | tuple[str, ...] = (), overwrite: bool = False,
                        on_tensor: OnTensor | None = None) -> ConversionStats:
    """Writes `out_dir` = params/ + model_config.json + conversion.json + tokenizer files."""
    start = time.perf_counter()
    check_output(out_dir, overwrite)
    if is_remote(hf_dir) and not epath.Path(hf_dir).is_dir():
        raise CheckpointReadError(f"Hugging Face folder {hf_dir} does not exist")
    try:
        src = open_hf(local_copy(hf_dir), overrides)
    except IncompleteFolderError as e:
        raise CheckpointReadError(str(e)) from None
    dtype = resolve_dtype(dtype, src.reader)
    main_dtype, other_dtypes = source_dtypes(src.reader)
    with atomic_folder(out_dir, overwrite=overwrite) as tmp:
        flat, stats = hf_to_arrays(src, dtype=dtype, scan=scan_layers, strict=strict,
                                   on_tensor=on_tensor)
        save_params(tmp / PARAMS_DIR, flat)
        del flat
        info = src.info
        write_model_config(tmp, info.config)
        copied = copy_side_files(src.folder, tmp)
        write_json(tmp / CONVERSION_INFO, {
            "format_version": 1,
            "converter": f"mini_internvl_jax {__version__}",
            "source": str(hf_dir) if is_remote(hf_dir) else str(src.folder.resolve()),
            "source_checkpoint": src.reader.description.replace(str(src.folder), str(hf_dir)),
            "layout": info.layout,
            "native_saved_names": _saved_names(src.reader),
            "template": info.config.template, "template_source": info.template_source,
            "image_token_id": info.config.image_token_id,
            "image_token_source": info.image_token_source,
            "param_dtype": dtype, "scan_layers": scan_layers,
            "source_dtype": main_dtype, "source_dtype_exceptions": other_dtypes,
            "tensors": stats.tensors, "parameters": stats.parameters, "bytes": stats.bytes,
            "ignored_tensors": stats.ignored, "copied_files": copied,
            "source_config": src.hf_config,
        })
    stats.seconds = time.perf_counter() - start
    return stats
