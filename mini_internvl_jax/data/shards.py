"""InternVL meta JSON + JSONL + image files -> self-contained ArrayRecord shards.

A pod host reading millions of small image files from GCS spends its time on requests, not
bytes; shards hold each record with its images embedded (`sources.encode_record`), so a host
reads a few large files. The output folder is

    OUT/
      meta.json        an InternVL meta JSON over the shards (format array_record): train on it
                       with `data.meta_path: OUT/meta.json`
      manifest.json    per dataset and shard: records, bytes, sha256 (`verify_shards` checks it)
      NAME/NAME-00000-of-00004.array_record ...

Shards of a dataset are contiguous runs of its records, in file order, cut where the running
byte count crosses equal fractions of the total, so they differ in size by at most one record.
The folder is built under a temporary name and renamed into place when complete.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import re
import struct
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from etils import epath
from tqdm import tqdm

from mini_internvl_jax.data.errors import DataError, SkipSample
from mini_internvl_jax.data.sources import (
    DatasetSpec,
    count_array_records,
    encode_record,
    encoded_size,
    read_meta,
    record_from_json,
    write_array_record,
)
from mini_internvl_jax.fileio import IncompleteFolderError, atomic_folder, check_complete, is_remote

MANIFEST = "manifest.json"
META = "meta.json"
MANIFEST_FORMAT = "mini-internvl-jax shards v1"
DEFAULT_SHARD_BYTES = 256 << 20
# Smaller shards are all per-file overhead (a 1-byte target made one shard per record, 16x
# the data); larger ones than this are slow to hash and to re-read after a damaged byte.
MIN_SHARD_MB, MAX_SHARD_MB = 1.0, 65536.0
_HASH_CHUNK = 1 << 22


@dataclass(frozen=True)
class _Item:
    """One usable record of a JSONL file: its object without 'image' and its image paths."""

    line: int
    item: dict
    images: list[str]

    def size(self) -> int:
        """Bytes of its record, without reading the images."""
        return encoded_size(self.item, [epath.Path(p).stat().length for p in self.images])

    def encode(self) -> bytes:
        return encode_record(self.item, [epath.Path(p).read_bytes() for p in self.images])


def _items(spec: DatasetSpec, skipped: list[dict]) -> Iterator[_Item]:
    """The dataset's records in file order; unusable ones are appended to `skipped`."""
    path = epath.Path(spec.annotation[0])
    with path.open("rb") as f:
        for line, raw in enumerate(f, 1):
            if not raw.strip():
                continue
            try:
                try:
                    item = json.loads(raw)
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise SkipSample("malformed_json", f"invalid JSON: {e}") from None
                rec = record_from_json(item, spec.root, spec.name, line)
                for p in rec.images:
                    if not epath.Path(p).is_file():
                        raise SkipSample("missing_image", f"{p} is not a file")
            except SkipSample as e:
                skipped.append({"line": line, "reason": e.reason, "detail": e.detail})
                continue
            bare = {k: v for k, v in item.items() if k != "image"}
            yield _Item(line, bare, [str(p) for p in rec.images])


def _encode_same(it: _Item, line: int, spec: DatasetSpec) -> bytes:
    if it.line != line:  # the second pass must see what the first one planned
        raise DataError(f"dataset {spec.name!r}: {spec.annotation[0]} or its images changed "
                        "while the shards were being built")
    return it.encode()


def _shard_of(sizes: list[int], num_shards: int) -> list[int]:
    """Shard number per record: record k goes where the midpoint of its bytes falls."""
    total = sum(sizes) or 1
    out, start = [], 0
    for s in sizes:
        out.append(min(num_shards - 1, int((start + s / 2) * num_shards / total)))
        start += s
    # A record larger than a shard's share can leave a number unused: renumber densely.
    dense = {k: i for i, k in enumerate(sorted(set(out)))}
    return [dense[k] for k in out]


def shard_bytes_from_mb(mb: float) -> int:
    """`--shard-mb` in bytes; DataError outside [MIN_SHARD_MB, MAX_SHARD_MB]."""
    if not MIN_SHARD_MB <= mb <= MAX_SHARD_MB:  # also refuses nan
        raise DataError(f"--shard-mb must be between {MIN_SHARD_MB:g} and {MAX_SHARD_MB:g} "
                        f"(MiB per shard), got {mb:g}")
    return int(mb * 2**20)


def file_sha256(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with epath.Path(path).open("rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def _shardable_specs(meta_path) -> list:
    """The meta file's datasets, each one a JSONL dataset whose name can name shard files."""
    specs = read_meta(meta_path)
    for spec in specs:
        if not re.fullmatch(r"[\w.-]+", spec.name):
            raise DataError(f"dataset name {spec.name!r} of {meta_path} cannot name shard "
                            "files; use letters, digits, '_', '-' and '.'")
        if spec.format != "jsonl":
            raise DataError(f"dataset {spec.name!r} of {meta_path} has format {spec.format!r}; "
                            "only JSONL datasets are converted to shards")
    return specs


def _plan(spec, shard_bytes: int, skip_bad: bool, progress: bool) -> tuple:
    """Pass 1 of a build: (spec, skipped, usable lines, shard of each) from record sizes (image
    sizes from stat)."""
    skipped: list[dict] = []
    lines, sizes = [], []
    for it in tqdm(_items(spec, skipped), desc=f"sizing {spec.name}", unit="rec",
                   disable=not progress):
        lines.append(it.line)
        sizes.append(it.size())
    if skipped and not skip_bad:
        shown = "; ".join(f"{spec.annotation[0]}:{s['line']}: {s['reason']}: {s['detail']}"
                          for s in skipped[:5])
        more = f" (and {len(skipped) - 5} more)" if len(skipped) > 5 else ""
        raise DataError(f"dataset {spec.name!r}: {len(skipped)} record(s) cannot be "
                        f"embedded: {shown}{more}. Fix them or build with skip_bad")
    if not sizes:
        raise DataError(f"dataset {spec.name!r}: no usable records in {spec.annotation[0]}")
    num = min(len(sizes), max(1, math.ceil(sum(sizes) / shard_bytes)))
    return spec, skipped, lines, _shard_of(sizes, num)


def build_shards(meta_path: str | os.PathLike, out_dir: str | os.PathLike, *,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, skip_bad: bool = False,
                 overwrite: bool = False, progress: bool = True) -> dict:
    """Writes shards, meta.json and manifest.json for every JSONL dataset of `meta_path`.

    A record that cannot be embedded (malformed line, image file missing) stops the build with
    a `DataError` naming it, unless `skip_bad`: then it is left out and listed in the manifest.
    Images are copied as stored, not decoded: `validate.validate_dataset` finds corrupt ones.
    Returns the manifest.
    """
    if shard_bytes < 1:
        raise DataError(f"shard_bytes must be >= 1, got {shard_bytes}")
    specs = _shardable_specs(meta_path)
    out = epath.Path(out_dir)
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} already exists; not replacing it without overwrite")
    plans = [_plan(spec, shard_bytes, skip_bad, progress) for spec in specs]

    # Pass 2: write, in the same record order.
    total = sum(len(lines) for _, _, lines, _ in plans)
    datasets: dict[str, Any] = {}
    meta: dict[str, Any] = {}
    with atomic_folder(out, overwrite=overwrite) as tmp, \
            tqdm(total=total, desc="writing shards", unit="rec", disable=not progress) as bar:
        for spec, skipped, lines, shard_of in plans:
            counts = [shard_of.count(k) for k in range(shard_of[-1] + 1)]
            records = (_encode_same(it, lines[k], spec)
                       for k, it in enumerate(_items(spec, [])))
            shards = []
            for k, n in enumerate(counts):
                rel = f"{spec.name}/{spec.name}-{k:05d}-of-{len(counts):05d}.array_record"
                if write_array_record(tmp / rel, itertools.islice(records, n)) != n:
                    raise DataError(f"dataset {spec.name!r}: {spec.annotation[0]} lost records "
                                    "while the shards were being built")
                bar.update(n)
                shards.append({"file": rel, "records": n,
                               "bytes": (tmp / rel).stat().st_size,
                               "sha256": file_sha256(tmp / rel)})
            datasets[spec.name] = {
                "source": spec.annotation[0], "records": sum(counts),
                "bytes": sum(s["bytes"] for s in shards), "shards": shards,
                "skipped": skipped}
            entry: dict[str, Any] = {
                "format": "array_record", "annotation": [s["file"] for s in shards],
                "repeat_time": spec.repeat_time, "data_augment": spec.data_augment,
                "length": sum(counts)}
            if spec.max_dynamic_patch is not None:
                entry["max_dynamic_patch"] = spec.max_dynamic_patch
            meta[spec.name] = entry
        manifest = {"format": MANIFEST_FORMAT, "source_meta": str(meta_path), "meta": META,
                    "records": sum(d["records"] for d in datasets.values()),
                    "bytes": sum(d["bytes"] for d in datasets.values()),
                    "datasets": datasets}
        (tmp / META).write_text(json.dumps(meta, indent=1))
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def find_manifest(path: str | os.PathLike) -> epath.Path | None:
    """The manifest a path names (the file, or a shard folder holding one); None for other
    files, e.g. a meta JSON."""
    p = epath.Path(path)
    if p.is_dir():
        p = p / MANIFEST
        return p if p.exists() else None
    if p.name != MANIFEST or not p.exists():
        return None
    return p


def read_manifest(path: str | os.PathLike) -> tuple[epath.Path, dict]:
    """(shard folder, manifest) of a shard folder or its manifest.json."""
    found = find_manifest(path)
    if found is None:
        raise DataError(f"{path}: no {MANIFEST} (expected a folder made by mivl-build-shards "
                        "or its manifest)")
    try:
        check_complete(found.parent)
        manifest = json.loads(found.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{found} is not valid JSON: {e}") from None
    except IncompleteFolderError as e:
        raise DataError(str(e)) from None
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise DataError(f"{found}: not a shard manifest (format should be "
                        f"{MANIFEST_FORMAT!r})")
    _check_manifest(found, manifest)
    return found.parent, manifest


_SHARD_FIELDS = {"file": str, "records": int, "bytes": int, "sha256": str}


def _check_manifest(found: epath.Path, manifest: dict) -> None:
    """DataError naming the first field of a hand-edited or truncated manifest that is missing
    or of the wrong type (readers index these fields without further checks)."""
    if not isinstance(manifest.get("meta"), str):
        raise DataError(f"{found}: \"meta\" must name the meta JSON of the shards")
    datasets = manifest.get("datasets")
    if not isinstance(datasets, dict) or not datasets:
        raise DataError(f"{found}: \"datasets\" must be a non-empty object "
                        "{name: {shards: [...], ...}}")
    for name, d in datasets.items():
        shards = d.get("shards") if isinstance(d, dict) else None
        if not isinstance(shards, list) or not shards:
            raise DataError(f"{found}: datasets.{name}.shards must be a non-empty list")
        for k, shard in enumerate(shards):
            for field, kind in _SHARD_FIELDS.items():
                value = shard.get(field) if isinstance(shard, dict) else None
                if not isinstance(value, kind) or isinstance(value, bool) or (
                        isinstance(value, int) and value < 0):
                    raise DataError(f"{found}: datasets.{name}.shards[{k}].{field} must be "
                                    f"{'a non-negative integer' if kind is int else 'a string'}"
                                    f", got {value!r}")


def _shard_problem(f: epath.Path, entry: dict) -> str | None:
    """What differs between a shard file and its manifest entry (presence, size, sha256)."""
    if not f.exists():
        return f"{f}: missing"
    size = f.stat().length
    if size != entry["bytes"]:
        return f"{f}: {size} bytes, manifest says {entry['bytes']}"
    digest = file_sha256(f)
    if digest != entry["sha256"]:
        return f"{f}: sha256 {digest[:16]}..., manifest says {entry['sha256'][:16]}..."
    return None


def verify_shards(path: str | os.PathLike, *, progress: bool = True) -> dict:
    """Checks every shard of a manifest: present, size, record count and sha256 as recorded.

    Raises `DataError` listing every shard that differs; returns the manifest.
    """
    root, manifest = read_manifest(path)
    shards = [s for d in manifest["datasets"].values() for s in d["shards"]]
    problems = []
    for s in tqdm(shards, desc="verifying shards", unit="shard", disable=not progress):
        f = root / s["file"]
        if problem := _shard_problem(f, s):
            problems.append(problem)
            continue
        if is_remote(f):  # the hash matched; counting would open each remote file once more
            continue
        try:
            n = count_array_records(f)
        except (RuntimeError, OSError, struct.error) as e:
            problems.append(f"{f}: not a readable ArrayRecord file: {e}")
            continue
        if n != s["records"]:
            problems.append(f"{f}: {n} records, manifest says {s['records']}")
    if problems:
        raise DataError(f"{len(problems)} shard(s) of {root} do not match {MANIFEST}: "
                        + "; ".join(problems))
    return manifest


def check_shards_before_reading(meta_path: str | os.PathLike, specs: list[DatasetSpec],
                                policy: str, *, threads: int = 8) -> list[DatasetSpec]:
    """The specs to train on, after checking each shard named by a shard folder's meta.json
    against its manifest (presence, size, sha256) before any record is read.

    `policy` (`data.bad_shards`): "refuse" raises DataError listing every shard that differs;
    "skip" leaves those shards out and says how many shards and records it left out;
    "unchecked" reads the files as they are. A meta JSON without a manifest next to it (JSONL
    data, or shards made by another tool) is returned unchanged.
    """
    found = epath.Path(meta_path).parent / MANIFEST
    if policy == "unchecked" or not found.exists():
        return specs
    root, manifest = read_manifest(found)
    if epath.Path(meta_path).name != manifest["meta"]:
        return specs
    entries = {str(root / s["file"]): s for d in manifest["datasets"].values()
               for s in d["shards"]}
    files = [f for spec in specs if spec.format == "array_record" for f in spec.annotation
             if str(f) in entries]
    with ThreadPoolExecutor(threads) as pool:
        found_problems = list(pool.map(
            lambda f: _shard_problem(epath.Path(f), entries[str(f)]), files))
    bad = {f: p for f, p in zip(files, found_problems, strict=True) if p}
    if not bad:
        return specs
    if policy == "refuse":
        raise DataError(f"{len(bad)} shard(s) of {root} differ from {MANIFEST}, so they are not "
                        "read (rebuild them with mivl-build-shards, or set data.bad_shards: "
                        f"skip to train without them): {'; '.join(bad.values())}")
    kept = []
    for spec in specs:
        files_left = [f for f in spec.annotation if f not in bad]
        if files_left:
            kept.append(dataclasses.replace(spec, annotation=tuple(files_left)))
    records = sum(entries[str(f)]["records"] for f in bad)
    print(f"warning: skipping {len(bad)} shard(s) ({records} records) of {root} that differ "
          f"from {MANIFEST} (data.bad_shards: skip): {'; '.join(bad.values())}",
          file=sys.stderr, flush=True)
    if not kept:
        raise DataError(f"every shard of {meta_path} differs from {MANIFEST}; nothing to train "
                        "on")
    return kept
