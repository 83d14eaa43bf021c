"""Benchmark files as rows: JSONL / JSON, TSV (VLMEvalKit) and parquet (as published on HF).

  * `.jsonl` (one object a line) or `.json` (a list of objects): images are paths relative to
    `--image-root` (default: the data file's folder), a list of paths, or absent; where the
    task takes videos, `video` is a path (same root) and `num_frames` its frame count;
  * `.tsv` (VLMEvalKit's files): a header row; `image` holds base64-encoded image bytes, a
    Python-literal list of them (multi-image rows), or, when short, the `index` of the row
    whose image it shares (VLMEvalKit dedups images); `image_path` a path; list-valued cells
    (answers) are Python literals such as "['a', 'b']";
  * `.parquet`, or a folder of `*.parquet` shards (Hugging Face datasets' published form):
    image cells are {"bytes", "path"} structs. pyarrow is needed only for these.

`layout_of` names which published layout a file is (printed and written with the results).

Image fields, first found: `decoded_image` (MathVista), `image`, `image_path`, the official
releases' `image_local_name` (InfographicVQA), `imgname` (ChartQA), `filename`
(HallusionBench) and `data_id` (SEED-Bench), then `image_1` ... `image_N` (MMMU). A path that
does not exist is a `MissingImageError` naming the row, the field and the path
(`load_benchmark(skip_missing=True)` counts and skips such rows instead): a question is never
answered without its image.

Rows come back as (where, dict) with `where` = "FILE:LINE" for error messages; images as a
tuple of paths (str) or encoded bytes, a video as a one-element tuple holding a `VideoRef`;
`prepare_chat_inputs` opens either and puts the placeholder lines (`Image-1: <image>`...,
`Frame1: <image>`...) in front of the question.
"""

from __future__ import annotations

import ast
import base64
import binascii
import csv
import json
import sys
from pathlib import Path

from mini_internvl_jax.data.video import DEFAULT_NUM_FRAMES, MAX_NUM_FRAMES, VideoRef
from mini_internvl_jax.errors import UserError


class EvalDataError(UserError, ValueError):
    """A malformed evaluation file; the message names the file, row and field."""


class MissingImageError(EvalDataError):
    """A row names an image file that does not exist."""


ROW_ID_KEYS = ("index", "id", "question_id", "questionId", "pid")
IMAGE_KEYS = ("decoded_image", "image", "image_path", "image_local_name", "imgname", "filename",
              "data_id")


def layout_of(path: str | Path) -> str:
    """The published layout a benchmark file is in, from its form: VLMEvalKit's TSV, a Hugging
    Face dataset's parquet, or JSON / JSONL (the official releases' form)."""
    path = Path(path)
    if path.is_dir() or path.suffix.lower() == ".parquet":
        return "Hugging Face parquet"
    return {".tsv": "VLMEvalKit TSV", ".jsonl": "JSONL"}.get(path.suffix.lower(),
                                                             "official JSON")


def read_rows(path: str | Path) -> list[tuple[str, dict]]:
    path = Path(path)
    if path.is_dir():
        shards = sorted(path.glob("*.parquet"))
        if not shards:
            raise EvalDataError(f"{path} is a folder without *.parquet files")
        return [r for s in shards for r in _read_parquet(s)]
    if not path.is_file():
        raise EvalDataError(f"evaluation file {path} does not exist")
    suffix = path.suffix.lower()
    readers = {".jsonl": _read_jsonl, ".json": _read_json, ".tsv": _read_tsv,
               ".parquet": _read_parquet}
    if suffix not in readers:
        raise EvalDataError(f"{path}: unknown format {suffix!r}; expected one of "
                            f"{sorted(readers)} or a folder of parquet shards")
    rows = readers[suffix](path)
    if not rows:
        raise EvalDataError(f"{path} holds no rows")
    return rows


def _read_jsonl(path: Path) -> list[tuple[str, dict]]:
    rows = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise EvalDataError(f"{path}:{n}: not valid JSON ({e})") from None
            if not isinstance(obj, dict):
                raise EvalDataError(f"{path}:{n}: expected a JSON object")
            rows.append((f"{path}:{n}", obj))
    return rows


def _read_json(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # JSON lines named .json (POPE's coco_pope_*.json)
            return _read_jsonl(path)
        raise EvalDataError(f"{path}: not valid JSON ({e})") from None
    if isinstance(data, dict):
        for key in ("data", "questions"):  # DocVQA / InfoVQA / TextVQA, SEED-Bench
            if isinstance(data.get(key), list):
                data = data[key]
                break
        else:  # MathVista's testmini.json: {pid: problem}
            if data and all(isinstance(v, dict) for v in data.values()):
                data = [{"pid": k, **v} for k, v in data.items()]
    if not isinstance(data, list) or not all(isinstance(x, dict) for x in data):
        raise EvalDataError(f"{path}: expected a list of objects, {{'data': [...]}}, "
                            "{'questions': [...]} or {id: object}")
    return [(f"{path}:item {i}", x) for i, x in enumerate(data)]


def _read_tsv(path: Path) -> list[tuple[str, dict]]:
    csv.field_size_limit(sys.maxsize)  # base64 images are long cells
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f, delimiter="\t")
        rows = [(f"{path}:{n}", dict(r)) for n, r in enumerate(reader, 2)]
    by_index = {r.get("index"): r.get("image") for _, r in rows if r.get("index") is not None}
    for where, r in rows:
        img = r.get("image")
        if img is not None and len(img) <= 64 and img in by_index:
            r["image"] = by_index[img]  # VLMEvalKit stores a shared image once
        cell = r.get("image")
        if cell and cell.lstrip().startswith("["):  # several images (base64 never starts so)
            r["image"] = [_b64(c, where) for c in as_list(cell, where, "image")]
        elif cell:
            r["image"] = _b64(cell, where)
    return rows


def _b64(text, where: str) -> bytes:
    if not isinstance(text, str):
        raise EvalDataError(f"{where}: column 'image' holds {text!r}, not base64 image data")
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise EvalDataError(f"{where}: column 'image' is not base64 image data") from None


def _read_parquet(path: Path) -> list[tuple[str, dict]]:
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise EvalDataError(f"{path}: reading parquet needs pyarrow (pip install pyarrow)"
                            ) from None
    try:
        table = pq.read_table(path)
    except Exception as e:  # pyarrow raises its own error types for broken files
        raise EvalDataError(f"{path}: not a readable parquet file ({e})") from None
    return [(f"{path}:row {i}", r) for i, r in enumerate(table.to_pylist())]


def as_list(value, where: str, name: str) -> list:
    """A list cell: a list, a Python-literal list in a string (TSV), or one scalar."""
    if isinstance(value, (list, tuple)):
        return list(value)
    if isinstance(value, str) and value.strip().startswith("["):
        try:
            parsed = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            raise EvalDataError(f"{where}: field {name!r} looks like a list but is not a "
                                f"valid literal: {value[:80]!r}") from None
        if isinstance(parsed, list):
            return parsed
    if hasattr(value, "tolist"):
        return list(value.tolist())
    return [value]


def image_refs(row: dict, root: Path, where: str, *, required: bool,
               videos: bool = False) -> tuple:
    """The row's images in order as paths or encoded bytes: the first of `IMAGE_KEYS`, then
    `image_1` ... `image_N` (MMMU). Paths must exist (`MissingImageError` otherwise).

    With `videos` (tasks whose prompts suit a clip), a row may instead hold `video` (path,
    bytes or parquet struct) and optional `num_frames` (default 8): one `VideoRef`. Tasks
    without it reject a `video` field rather than silently answer without the clip.
    """
    row_id = next((row[k] for k in ROW_ID_KEYS if row.get(k) not in (None, "")), None)
    # a missing file also names the row as the user knows it, not only by its line
    item = "" if row_id is None else f"item {str(row_id)!r}; "
    first = next((k for k in IMAGE_KEYS if row.get(k) not in (None, "")), None)
    keys = [first] if first else []
    keys += sorted((k for k in row if k.startswith("image_") and k[6:].isdigit()
                    and row[k] not in (None, "")), key=lambda k: int(k[6:]))
    if row.get("video") not in (None, ""):
        if not videos:
            raise EvalDataError(f"{where}: this task takes images only, not field 'video' "
                                "(video rows: --task vqa)")
        if keys:
            raise EvalDataError(f"{where}: fields 'video' and {keys[0]!r} are exclusive (a row "
                                "holds images or one video)")
        source = _one_ref(row["video"], root, where, "video", "a video", check=False)
        return (VideoRef(source, _num_frames(row.get("num_frames"), where)),)
    if row.get("num_frames") not in (None, ""):
        raise EvalDataError(f"{where}: field 'num_frames' is given without a 'video'")
    refs = []
    for k in keys:
        if not isinstance(row[k], list):
            refs.append(_one_ref(row[k], root, where, k, "an image", item=item))
        elif not row[k]:
            raise EvalDataError(f"{where}: field {k!r} is an empty list; expected image paths")
        else:
            refs += [_one_ref(v, root, where, f"{k}[{i}]", "an image", item=item)
                     for i, v in enumerate(row[k])]
    if required and not refs:
        raise EvalDataError(f"{where}: no image (fields {', '.join(IMAGE_KEYS)} or "
                            "'image_1'...)")
    return tuple(refs)


def _num_frames(value, where: str) -> int:
    """A positive int; TSV cells hold it as digits."""
    if value in (None, ""):
        return DEFAULT_NUM_FRAMES
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_NUM_FRAMES:
        raise EvalDataError(f"{where}: field 'num_frames' must be a positive integer, at most "
                            f"{MAX_NUM_FRAMES} (frames sampled from the video), got {value!r}")
    return value


def _one_ref(v, root: Path, where: str, key: str, kind: str, check: bool = True,
             item: str = ""):
    if isinstance(v, bytes):
        return v
    path = None
    if isinstance(v, dict):  # HF parquet image struct
        if v.get("bytes"):
            return bytes(v["bytes"])
        path = v.get("path") or None
    elif isinstance(v, str) and v:
        path = v
    if path is not None:
        full = root / path
        if check and not full.is_file():
            raise MissingImageError(f"{where}: field {key!r} names image {path!r}, which is not "
                                    f"at {full} ({item}set --image-root to the folder the "
                                    "paths are relative to)")
        return str(full)
    got = "an empty string" if v == "" else type(v).__name__
    raise EvalDataError(f"{where}: field {key!r} must be {kind} path, bytes or a "
                        f"{{'bytes', 'path'}} struct, got {got}")
