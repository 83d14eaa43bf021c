"""Hugging Face checkpoint files, read and written one tensor at a time.

Reading goes through the `safetensors` library (`safe_open`, numpy framework; bfloat16 arrives
as ml_dtypes' type): headers are validated when a file is opened, so names, shapes and dtypes
are known before any data is read, and each `read` copies one tensor out of the file. Writing
streams: the headers come from a plan of (name, dtype, shape), then tensors follow in plan order,
so the exporter never holds more than the tensor in hand (the library's writer needs them all).
"""

from __future__ import annotations

import json
import math
import os
import re
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import ml_dtypes
import numpy as np
from safetensors import SafetensorError, safe_open

from mini_internvl_jax.convert.errors import CheckpointReadError, ConversionError

SAFETENSORS_DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64),
    "I32": np.dtype(np.int32), "I16": np.dtype(np.int16), "I8": np.dtype(np.int8),
    "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
    "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn), "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2),
}
_DTYPE_CODES = {v: k for k, v in SAFETENSORS_DTYPES.items()}
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
TORCH_INDEX = "pytorch_model.bin.index.json"
TORCH_SINGLE = "pytorch_model.bin"

if sys.byteorder != "little":  # safetensors data is little-endian; so is every supported host
    raise ImportError("mini_internvl_jax.convert needs a little-endian host")


def copy_into(dst: np.ndarray, src: np.ndarray) -> None:
    """`dst[...] = src`, through same-size integer views when no cast is needed: ml_dtypes'
    bfloat16 copies take numpy's slow per-element path (25x slower for a contiguous copy)."""
    if dst.dtype == src.dtype and dst.dtype.kind not in "biu":
        uint = np.dtype(f"u{dst.dtype.itemsize}")
        dst.view(uint)[...] = src.view(uint)
    else:
        dst[...] = src


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: np.dtype
    shape: tuple[int, ...]


def _open_safetensors(path: Path) -> Any:
    """`safe_open` with the library's validation errors turned into ours, naming the file."""
    try:
        return safe_open(str(path), framework="numpy")
    except (SafetensorError, OSError) as e:
        raise CheckpointReadError(f"{path} is not a valid safetensors file: {e}") from None


def read_safetensors_header(path: Path) -> dict[str, TensorInfo]:
    """Tensor infos of one .safetensors file (the library checks offsets against the size)."""
    path = Path(path)
    handle = _open_safetensors(path)
    infos = {}
    for name in handle.keys():
        view = handle.get_slice(name)
        code = view.get_dtype()
        if code not in SAFETENSORS_DTYPES:
            raise CheckpointReadError(f"{path}: tensor {name!r} has dtype {code}, which this "
                                      f"converter does not read ({sorted(SAFETENSORS_DTYPES)})")
        infos[name] = TensorInfo(path, SAFETENSORS_DTYPES[code], tuple(view.get_shape()))
    return infos


class CheckpointReader:
    """Names, shapes and dtypes of a checkpoint's tensors up front; data one tensor at a time."""

    def __init__(self, infos: dict[str, TensorInfo], description: str):
        self.infos = infos
        self.description = description
        self._handles: dict[Path, Any] = {}

    def __contains__(self, name: str) -> bool:
        return name in self.infos

    @property
    def names(self) -> list[str]:
        return list(self.infos)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.infos[name].shape

    def dtype(self, name: str) -> np.dtype:
        return self.infos[name].dtype

    def read(self, name: str) -> np.ndarray:
        """A fresh, writable copy of one tensor (safetensors files only; see subclasses)."""
        info = self.infos[name]
        if info.file not in self._handles:
            self._handles[info.file] = _open_safetensors(info.file)
        try:
            out = self._handles[info.file].get_tensor(name)
        except (SafetensorError, OSError) as e:
            raise CheckpointReadError(f"cannot read tensor {name!r} from {info.file}: {e}") \
                from None
        return out if out.flags.writeable else out.copy()


class RenamedReader(CheckpointReader):
    """Another reader's tensors under translated names."""

    def __init__(self, base: CheckpointReader, rename: Callable[[str], str]):
        self.base = base
        self.original = {rename(n): n for n in base.names}
        if len(self.original) != len(base.names):
            raise CheckpointReadError(f"{base.description} holds the same tensor under two "
                                      "names (saved and module form)")
        super().__init__({k: base.infos[v] for k, v in self.original.items()}, base.description)

    def read(self, name: str) -> np.ndarray:
        return self.base.read(self.original[name])


class TorchCheckpointReader(CheckpointReader):
    """`pytorch_model.bin` files, loaded with `weights_only=True` (the whole file at once)."""

    def __init__(self, files: list[Path], description: str):
        try:
            import torch
        except ImportError:
            raise CheckpointReadError(
                f"{description} is a pytorch_model.bin checkpoint, which needs torch installed; "
                "install torch or save the checkpoint as safetensors") from None
        self._tensors = {}
        for file in files:
            try:
                state = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
            except Exception as e:  # torch raises many types for corrupt pickles
                raise CheckpointReadError(f"cannot read {file} with torch.load(weights_only=True):"
                                          f" {e}") from None
            if not isinstance(state, dict):
                raise CheckpointReadError(f"{file} does not hold a state dict")
            self._tensors.update({k: v for k, v in state.items() if isinstance(v, torch.Tensor)})
        infos = {k: TensorInfo(Path(description), _torch_to_numpy_dtype(v.dtype), tuple(v.shape))
                 for k, v in self._tensors.items()}
        super().__init__(infos, description)

    def read(self, name: str) -> np.ndarray:
        import torch

        t = self._tensors[name].detach().cpu().contiguous()
        if t.dtype == torch.bfloat16:
            return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16).copy()
        return t.numpy().copy()


def _torch_to_numpy_dtype(torch_dtype) -> np.dtype:
    import torch

    if torch_dtype == torch.bfloat16:
        return np.dtype(ml_dtypes.bfloat16)
    return np.dtype(torch.empty((), dtype=torch_dtype).numpy().dtype)


def _read_index(path: Path) -> dict[str, str]:
    try:
        weight_map = json.loads(path.read_text())["weight_map"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise CheckpointReadError(f"cannot read the checkpoint index {path}: {e!r}; expected "
                                  "JSON with a 'weight_map' of tensor name -> file") from None
    if not isinstance(weight_map, dict):
        raise CheckpointReadError(f"{path}: 'weight_map' must map tensor names to files")
    return weight_map


def open_checkpoint(folder: str | Path) -> CheckpointReader:
    """Reader over `model.safetensors`, a sharded safetensors index, or `pytorch_model.bin`."""
    folder = Path(folder)
    if (folder / SAFETENSORS_INDEX).is_file():
        weight_map = _read_index(folder / SAFETENSORS_INDEX)
        infos: dict[str, TensorInfo] = {}
        for file in sorted(set(weight_map.values())):
            if not (folder / file).is_file():
                raise CheckpointReadError(f"{folder / SAFETENSORS_INDEX} lists shard {file!r}, "
                                          f"which is missing from {folder}")
            header = read_safetensors_header(folder / file)
            for name in (n for n, f in weight_map.items() if f == file):
                if name not in header:
                    raise CheckpointReadError(f"{folder / SAFETENSORS_INDEX} places tensor "
                                              f"{name!r} in {file}, which does not contain it")
                infos[name] = header[name]
        return CheckpointReader(infos, str(folder / SAFETENSORS_INDEX))
    if (folder / SAFETENSORS_SINGLE).is_file():
        path = folder / SAFETENSORS_SINGLE
        return CheckpointReader(read_safetensors_header(path), str(path))
    if (folder / TORCH_INDEX).is_file():
        files = sorted(set(_read_index(folder / TORCH_INDEX).values()))
        return TorchCheckpointReader([folder / f for f in files], str(folder / TORCH_INDEX))
    if (folder / TORCH_SINGLE).is_file():
        return TorchCheckpointReader([folder / TORCH_SINGLE], str(folder / TORCH_SINGLE))
    raise CheckpointReadError(f"no checkpoint found in {folder}: expected {SAFETENSORS_SINGLE}, "
                              f"{SAFETENSORS_INDEX}, {TORCH_SINGLE} or {TORCH_INDEX}")


# --------------------------------------------------------------------------------------------
# writing


_SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
               "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


def parse_size(text: str | int) -> int:
    """`5GB`, `500MB`, `2GiB` or a byte count -> bytes."""
    if isinstance(text, int):
        return text
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", str(text))
    if not m or m.group(2).upper() not in _SIZE_UNITS:
        raise ConversionError(f"size {text!r} is not understood; use e.g. 5GB, 500MB or 2GiB")
    size = int(float(m.group(1)) * _SIZE_UNITS[m.group(2).upper()])
    if size <= 0:
        raise ConversionError(f"size {text!r} must be positive")
    return size


@dataclass(frozen=True)
class PlannedTensor:
    name: str
    dtype: np.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def plan_shards(tensors: Iterable[PlannedTensor], max_shard_bytes: int
                ) -> list[list[PlannedTensor]]:
    """Consecutive groups of at most `max_shard_bytes` (a larger tensor gets a shard alone)."""
    shards: list[list[PlannedTensor]] = [[]]
    size = 0
    for t in tensors:
        if shards[-1] and size + t.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(t)
        size += t.nbytes
    return shards


def _header_bytes(tensors: list[PlannedTensor]) -> bytes:
    header: dict = {"__metadata__": {"format": "pt"}}
    offset = 0
    for t in tensors:
        if t.dtype not in _DTYPE_CODES:
            raise ConversionError(f"tensor {t.name!r}: dtype {t.dtype} cannot be stored in "
                                  "safetensors")
        header[t.name] = {"dtype": _DTYPE_CODES[t.dtype], "shape": list(t.shape),
                          "data_offsets": [offset, offset + t.nbytes]}
        offset += t.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw


class SafetensorsWriter:
    """Writes a planned set of tensors, in plan order, to one file or to index-linked shards."""

    def __init__(self, folder: Path, tensors: list[PlannedTensor], max_shard_bytes: int):
        self.folder = Path(folder)
        self.shards = plan_shards(tensors, max_shard_bytes)
        n = len(self.shards)
        self.files = ([SAFETENSORS_SINGLE] if n == 1 else
                      [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)])
        self._order = [(s, t) for s, shard in enumerate(self.shards) for t in shard]
        self._next = 0
        self._file: BinaryIO | None = None
        self._file_index = -1

    def write(self, name: str, array: np.ndarray) -> None:
        if self._next >= len(self._order):
            raise ConversionError(f"tensor {name!r} was not planned")
        shard, planned = self._order[self._next]
        if name != planned.name:
            raise ConversionError(f"tensor {name!r} written out of order; expected "
                                  f"{planned.name!r}")
        if array.dtype != planned.dtype or tuple(array.shape) != planned.shape:
            raise ConversionError(f"tensor {name!r} is {array.dtype} {array.shape}, planned "
                                  f"{planned.dtype} {planned.shape}")
        if not array.flags.c_contiguous:
            contiguous = np.empty(array.shape, array.dtype)
            copy_into(contiguous, array)
            array = contiguous
        if shard != self._file_index:
            self._open(shard)
        assert self._file is not None
        self._file.write(array.reshape(-1).view(np.uint8).data)
        self._next += 1

    def _open(self, shard: int) -> None:
        if self._file is not None:
            self._file.close()
        self._file = open(self.folder / self.files[shard], "wb")
        self._file_index = shard
        self._file.write(_header_bytes(self.shards[shard]))

    def abort(self) -> None:
        """Closes the open file after an error; the caller discards the folder."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Finishes the last file and writes the index; every planned tensor must be written."""
        if self._file is not None:
            self._file.flush()
            os.fsync(self._file.fileno())
            self._file.close()
            self._file = None
        if self._next != len(self._order):
            missing = self._order[self._next][1].name
            raise ConversionError(f"checkpoint incomplete: tensor {missing!r} was never written")
        if len(self.files) > 1:
            index = {"metadata": {"total_size": sum(t.nbytes for _, t in self._order)},
                     "weight_map": {t.name: self.files[s] for s, t in self._order}}
            (self.folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")
