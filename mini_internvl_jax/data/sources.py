"""Record sources: InternVL meta JSON + JSONL, ArrayRecord files and TFDS data sources.

Every source gives random access to `Record`s (conversations, image references, where it
came from). A meta JSON names the datasets of a training stage:

    {"name": {"root": "images/", "annotation": "data.jsonl", "repeat_time": 1,
              "data_augment": false, "max_dynamic_patch": 6}, ...}

`annotation` ending in `.jsonl` is InternVL's format (one JSON object per line, `image` a
path or list of paths relative to `root`, or `video` a path relative to `root` with an optional
`clip` [start, end] in seconds, or neither for text-only); ending in
`.array_record` (a glob or list is fine) it holds `encode_record` records; `"format": "tfds"`
with `tfds_name`, `data_dir`, `split` reads a prepared TFDS dataset via `tfds.data_source`.
Relative paths are resolved against the meta file's folder. Paths go through `etils.epath`,
so `gs://` works where a file system for it is installed.
"""

from __future__ import annotations

import abc
import json
import logging
import math
import os
import struct
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from etils import epath

from mini_internvl_jax.data.errors import DataError, SkipSample
from mini_internvl_jax.fileio import IncompleteFolderError, atomic_file, check_complete

log = logging.getLogger(__name__)

_META_KEYS = {"root", "annotation", "repeat_time", "data_augment", "length",
              "max_dynamic_patch", "format", "tfds_name", "data_dir", "split", "fields",
              "caption_prompt"}
_RECORD_MAGIC = b"IVLR1\n"
DEFAULT_CAPTION_PROMPT = "Describe the image briefly."


@dataclass(frozen=True)
class DatasetSpec:
    """One entry of a meta JSON."""

    name: str
    format: str  # "jsonl" | "array_record" | "tfds"
    root: str = ""
    annotation: tuple[str, ...] = ()
    repeat_time: float = 1.0
    data_augment: bool = False
    max_dynamic_patch: int | None = None
    tfds_name: str = ""
    data_dir: str = ""
    split: str = "train"
    fields: dict = field(default_factory=dict)
    caption_prompt: str = DEFAULT_CAPTION_PROMPT


@dataclass
class Record:
    """A raw sample: conversations as stored, images as paths, encoded bytes or arrays."""

    conversations: Any
    images: list
    source: str
    line: int  # 1-based line of a JSONL file, else 1-based record index
    video: str | None = None  # a video file (then `images` is empty)
    clip: tuple[float, float] | None = None  # the part of the video to sample, in seconds
    rejected: str | None = None  # a preference pair's rejected answer (then `conversations`
    #                               is the question and the chosen answer)


def _resolve(base: epath.Path, value: str) -> str:
    if "://" in value or os.path.isabs(value):
        return value
    return str(base / value)


def read_meta(meta_path: str | os.PathLike) -> list[DatasetSpec]:
    """Dataset specs of a meta JSON, validated, with relative paths resolved."""
    path = epath.Path(meta_path)
    if not path.exists():
        raise DataError(f"meta file {path} does not exist")
    if path.is_dir():
        raise DataError(f"meta file {path} is a folder; expected the meta JSON file (a shard "
                        "folder is read through its manifest.json)")
    try:
        check_complete(path.parent)  # e.g. shards whose upload was cut off
        meta = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"meta file {path} is not valid JSON: {e}") from None
    except IncompleteFolderError as e:
        raise DataError(f"meta file {path}: {e}") from None
    if not isinstance(meta, dict) or not meta:
        raise DataError(f"meta file {path} must be a non-empty JSON object "
                        "{dataset_name: {root, annotation, repeat_time, ...}}")
    base = path.parent
    specs = []
    for name, entry in meta.items():
        where = f"{path}: dataset {name!r}"
        if not isinstance(entry, dict):
            raise DataError(f"{where} must be an object, got {entry!r}")
        unknown = sorted(set(entry) - _META_KEYS)
        if unknown:
            log.warning("%s: ignoring unknown key(s) %s", where, unknown)
        rt = entry.get("repeat_time", 1)
        if isinstance(rt, bool) or not isinstance(rt, (int, float)) or rt <= 0:
            raise DataError(f"{where}: repeat_time must be a positive number, got {rt!r}")
        mdp = entry.get("max_dynamic_patch")
        if mdp is not None and (isinstance(mdp, bool) or not isinstance(mdp, int) or mdp < 1):
            raise DataError(f"{where}: max_dynamic_patch must be a positive integer, got {mdp!r}")
        root = _resolve(base, entry["root"]) if entry.get("root") else str(base)
        fmt = entry.get("format")
        if fmt != "tfds" and not entry.get("annotation"):
            raise DataError(f"{where}: missing \"annotation\" (the dataset's .jsonl or "
                            ".array_record file, relative to the meta file)")
        ann = entry.get("annotation", [])
        if not isinstance(ann, str | list) or not all(isinstance(a, str) for a in ann):
            raise DataError(f"{where}: \"annotation\" must be a file name or a list of them, "
                            f"got {ann!r}")
        ann = [ann] if isinstance(ann, str) else list(ann)
        if fmt is None:
            if ann and all(a.endswith(".jsonl") for a in ann):
                fmt = "jsonl"
            elif ann and all(".array_record" in a for a in ann):
                fmt = "array_record"
            else:
                raise DataError(f"{where}: cannot tell the format of annotation {ann!r}; use a "
                                ".jsonl or .array_record file or set \"format\"")
        common = dict(name=name, format=fmt, root=root, repeat_time=float(rt),
                      data_augment=bool(entry.get("data_augment", False)),
                      max_dynamic_patch=mdp)
        if fmt == "jsonl":
            if len(ann) != 1:
                raise DataError(f"{where}: a jsonl dataset needs exactly one annotation file")
            specs.append(DatasetSpec(annotation=(_resolve(base, ann[0]),), **common))
        elif fmt == "array_record":
            files = []
            for a in ann:
                a = _resolve(base, a)
                matched = sorted(str(p) for p in epath.Path(a).parent.glob(epath.Path(a).name))
                if not matched:
                    raise DataError(f"{where}: no ArrayRecord file matches {a}")
                files.extend(matched)
            specs.append(DatasetSpec(annotation=tuple(files), **common))
        elif fmt == "tfds":
            if not entry.get("tfds_name"):
                raise DataError(f"{where}: format tfds needs \"tfds_name\"")
            data_dir = _resolve(base, entry["data_dir"]) if entry.get("data_dir") else ""
            specs.append(DatasetSpec(
                tfds_name=entry["tfds_name"], data_dir=data_dir,
                split=entry.get("split", "train"), fields=dict(entry.get("fields") or {}),
                caption_prompt=entry.get("caption_prompt", DEFAULT_CAPTION_PROMPT), **common))
        else:
            raise DataError(f"{where}: format {fmt!r} is not jsonl, array_record or tfds")
    return specs


def record_from_json(item: Any, root: str, name: str, line: int,
                     blobs: list[bytes] | None = None) -> Record:
    """A JSONL object (or a decoded ArrayRecord record with its image `blobs`) as a `Record`,
    image paths resolved against `root`; a `SkipSample` when its structure is wrong."""
    if not isinstance(item, dict):
        raise SkipSample("malformed_json", f"line is {type(item).__name__}, not an object")
    video = item.get("video")
    if video not in (None, ""):
        return _video_record(item, video, root, name, line, blobs)
    images: list[str | bytes]
    if blobs:
        images = list(blobs)
    else:
        image = item.get("image")
        if image is None or image == "" or image == []:
            images = []
        elif isinstance(image, str):
            images = [_resolve(epath.Path(root), image)]
        elif isinstance(image, list) and all(isinstance(x, str) and x for x in image):
            images = [_resolve(epath.Path(root), x) for x in image]
        else:
            raise SkipSample("malformed_json", f"'image' must be a path or list of paths, "
                                               f"got {image!r}")
    if "conversations" not in item and "chosen" in item:  # MMPR / InternVL preference row
        return preference_record(item, images, name, line)
    if "conversations" not in item:
        raise SkipSample("malformed_json", "no 'conversations' field")
    return Record(conversations=item["conversations"], images=images, source=name, line=line)


def preference_record(item: dict, images: list, name: str, line: int) -> Record:
    """`{image, question, chosen, rejected}` (InternVL's MPO format) as a Record whose
    conversation is the question and the chosen answer, the rejected answer beside it."""
    for key in ("question", "chosen", "rejected"):
        if not isinstance(item.get(key), str) or not item[key].strip():
            raise SkipSample("malformed_json", f"preference row needs a non-empty string {key!r}")
    conv = [{"from": "human", "value": item["question"]}, {"from": "gpt", "value": item["chosen"]}]
    return Record(conversations=conv, images=images, source=name, line=line,
                  rejected=item["rejected"])


def _video_record(item: dict, video: Any, root: str, name: str, line: int,
                  blobs: list[bytes] | None) -> Record:
    """A `video` row: a path under `root`, optionally `clip`: [start, end] in seconds."""
    if not isinstance(video, str):
        raise SkipSample("malformed_json", f"'video' must be a path, got {video!r}")
    if blobs or item.get("image") not in (None, "", []):
        raise SkipSample("malformed_json", "a record has both 'image' and 'video'")
    clip = item.get("clip")
    if clip is not None:
        if not (isinstance(clip, list) and len(clip) == 2 and all(
                isinstance(x, (int, float)) and not isinstance(x, bool) for x in clip)
                and 0 <= clip[0] < clip[1]):
            raise SkipSample("malformed_json", f"'clip' must be [start, end] seconds with "
                                               f"0 <= start < end, got {clip!r}")
        clip = (float(clip[0]), float(clip[1]))
    if "conversations" not in item:
        raise SkipSample("malformed_json", "no 'conversations' field")
    return Record(conversations=item["conversations"], images=[], source=name, line=line,
                  video=_resolve(epath.Path(root), video), clip=clip)


class RecordSource(abc.ABC):
    """One dataset of the mix; JSONL, ArrayRecord and TFDS sources implement it."""

    name: str
    spec: DatasetSpec

    @abc.abstractmethod
    def __len__(self) -> int: ...

    @abc.abstractmethod
    def read(self, index: int) -> Record:
        """The record at `index`; a `SkipSample` when it cannot be parsed."""

    def line_of(self, index: int) -> int:
        """1-based position of a record in its file, for logs."""
        return index + 1

    def where(self, index: int) -> str:
        """Where a record is stored, for reports: `file:line` or `file record n`."""
        return f"dataset {self.name!r} record {index + 1}"


class JsonlSource(RecordSource):
    """InternVL JSONL with a byte-offset index built once; blank lines are not records."""

    _CHUNK = 1 << 26

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.name = spec.name
        self._path = spec.annotation[0]
        path = epath.Path(self._path)
        if not path.exists():
            raise DataError(f"dataset {spec.name!r}: annotation file {path} does not exist")
        starts, lengths, lines = [], [], []
        offset, line_no, carry = 0, 0, b""
        with path.open("rb") as f:
            while True:
                chunk = f.read(self._CHUNK)
                data = carry + chunk
                base = offset - len(carry)
                if not chunk:
                    ends = [len(data)] if data else []
                else:
                    ends = np.flatnonzero(np.frombuffer(data, np.uint8) == 10).tolist()
                begin = 0
                for end in ends:
                    line_no += 1
                    if data[begin:end].strip():
                        starts.append(base + begin)
                        lengths.append(end - begin)
                        lines.append(line_no)
                    begin = end + 1
                carry = data[begin:]
                offset += len(chunk)
                if not chunk:
                    break
        self._starts = np.asarray(starts, dtype=np.int64)
        self._lengths = np.asarray(lengths, dtype=np.int64)
        self._lines = np.asarray(lines, dtype=np.int64)
        self._local = threading.local()

    def __getstate__(self):
        state = dict(self.__dict__)
        del state["_local"]
        return state

    def __setstate__(self, state):
        self.__dict__.update(state)
        self._local = threading.local()

    def __len__(self) -> int:
        return len(self._starts)

    def line_of(self, index: int) -> int:
        return int(self._lines[index])

    def where(self, index: int) -> str:
        return f"{self._path}:{self.line_of(index)}"

    def read(self, index: int) -> Record:
        f = getattr(self._local, "f", None)
        if f is None:
            f = self._local.f = epath.Path(self._path).open("rb")
        f.seek(int(self._starts[index]))
        raw = f.read(int(self._lengths[index]))
        line = int(self._lines[index])
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise SkipSample("malformed_json", f"invalid JSON: {e}") from None
        return record_from_json(item, self.spec.root, self.name, line)


def encode_record(item: dict, images: Sequence[bytes] = ()) -> bytes:
    """An ArrayRecord record: the JSONL object, optionally with encoded images embedded
    (then the object has no 'image' key and the blobs are the images in order)."""
    js = json.dumps(item, ensure_ascii=False).encode()
    if not images:
        return js
    sizes = b"".join(struct.pack("<Q", len(b)) for b in images)
    return _RECORD_MAGIC + struct.pack("<II", len(js), len(images)) + sizes + js + b"".join(
        images)


def encoded_size(item: dict, image_sizes: Sequence[int] = ()) -> int:
    """len(encode_record(item, images)) from the images' sizes alone."""
    js = len(json.dumps(item, ensure_ascii=False).encode())
    if not image_sizes:
        return js
    return len(_RECORD_MAGIC) + 8 + 8 * len(image_sizes) + js + sum(image_sizes)


def decode_record(data: bytes) -> tuple[Any, list[bytes] | None]:
    if not data.startswith(_RECORD_MAGIC):
        return json.loads(data), None
    pos = len(_RECORD_MAGIC)
    js_len, n = struct.unpack_from("<II", data, pos)
    pos += 8
    sizes = struct.unpack_from(f"<{n}Q", data, pos)
    pos += 8 * n
    item = json.loads(data[pos:pos + js_len])
    pos += js_len
    blobs = []
    for s in sizes:
        blobs.append(data[pos:pos + s])
        pos += s
    if pos != len(data):
        raise ValueError(f"record has {len(data) - pos} trailing bytes")
    return item, blobs


def write_array_record(path: str | os.PathLike, records: Iterable[bytes]) -> int:
    """Writes records to an ArrayRecord file via a temporary name; returns the count."""
    from array_record.python.array_record_module import ArrayRecordWriter

    n = 0
    with atomic_file(path) as tmp:
        writer = ArrayRecordWriter(str(tmp), "group_size:1")
        for rec in records:
            writer.write(rec)
            n += 1
        writer.close()
    return n


def count_array_records(path: str | os.PathLike) -> int:
    """Records in one ArrayRecord file (read from its footer)."""
    from array_record.python.array_record_module import ArrayRecordReader

    reader = ArrayRecordReader(str(path))
    try:
        return int(reader.num_records())
    finally:
        reader.close()


class ArrayRecordSource(RecordSource):
    """Records of one or more ArrayRecord files (`encode_record`), read in file order."""

    def __init__(self, spec: DatasetSpec):
        import grain

        self.spec = spec
        self.name = spec.name
        try:
            self._src = grain.sources.ArrayRecordDataSource(list(spec.annotation))
        except (RuntimeError, OSError, ValueError) as e:  # truncated or overwritten files
            raise DataError(f"dataset {spec.name!r}: cannot open ArrayRecord file(s) "
                            f"{list(spec.annotation)}: {e}") from None
        self._ends: list[int] | None = None

    def __len__(self) -> int:
        return len(self._src)

    def _where_safe(self, index: int) -> str:
        try:
            return self.where(index)
        except (RuntimeError, OSError, struct.error):  # counting reads the damaged file too
            return f"record {index + 1} of {list(self.spec.annotation)}"

    def where(self, index: int) -> str:
        if self._ends is None:
            self._ends = np.cumsum([count_array_records(f) for f in self.spec.annotation]
                                   ).tolist()
        k = int(np.searchsorted(self._ends, index, side="right"))
        start = self._ends[k - 1] if k else 0
        return f"{self.spec.annotation[k]} record {index - start + 1}"

    def read(self, index: int) -> Record:
        try:
            raw = self._src[index]
        except (RuntimeError, OSError) as e:  # a damaged chunk: Riegeli's "Corrupted" error
            raise DataError(f"dataset {self.name!r}: {self._where_safe(index)} cannot be read, "
                            f"the shard is damaged ({str(e).splitlines()[0][:200]}); rebuild "
                            "it (mivl-build-shards) or check the folder with "
                            "mivl-validate-data") from None
        try:
            item, blobs = decode_record(raw)
        except (ValueError, struct.error, UnicodeDecodeError) as e:
            raise SkipSample("malformed_json", f"invalid record: {e}") from None
        return record_from_json(item, self.spec.root, self.name, index + 1, blobs)


def _text(v) -> str:
    if isinstance(v, np.ndarray) and v.ndim == 0:
        v = v.item()
    return v.decode() if isinstance(v, bytes) else str(v)


class TfdsSource(RecordSource):
    """A prepared TFDS dataset (ArrayRecord file format, no TensorFlow needed).

    `fields` maps record roles to feature names: `image` (encoded bytes, a uint8 HxWxC
    array, or a sequence of either) or `image_path` (paths under `root`), then the first of
    `conversations` (InternVL JSON text or a sequence feature with `from`/`value`),
    `caption` (becomes a caption-prompt turn + answer) or `question` + `answer`.
    """

    def __init__(self, spec: DatasetSpec):
        import tensorflow_datasets as tfds

        self.spec = spec
        self.name = spec.name
        f = dict(image="image", conversations="conversations", caption="caption",
                 question="question", answer="answer")
        f.update(spec.fields)
        self._fields = f
        try:
            self._src = tfds.data_source(spec.tfds_name, data_dir=spec.data_dir or None,
                                         split=spec.split)
        except Exception as e:  # tfds raises many types for a missing or unprepared dataset
            raise DataError(f"dataset {spec.name!r}: cannot open TFDS {spec.tfds_name!r} "
                            f"split {spec.split!r} in {spec.data_dir or 'the default dir'}: {e}"
                            ) from None

    def __len__(self) -> int:
        return len(self._src)

    def _images(self, ex) -> list:
        f = self._fields
        if f.get("image_path") and f["image_path"] in ex:
            value = ex[f["image_path"]]
            value = [value] if isinstance(value, (bytes, str)) else list(value)
            root = epath.Path(self.spec.root)
            return [_resolve(root, _text(v)) for v in value if _text(v)]
        value = ex.get(f["image"])
        if value is None:
            return []
        if isinstance(value, bytes) or (isinstance(value, np.ndarray) and value.dtype == np.uint8
                                        and value.ndim in (2, 3)):
            value = [value]
        out = []
        for v in value:
            if isinstance(v, np.ndarray) and v.dtype == object:
                v = v.item()
            if isinstance(v, bytes) and not v:
                continue
            out.append(v)
        return out

    def read(self, index: int) -> Record:
        ex = self._src[index]
        f = self._fields
        images = self._images(ex)
        if f["conversations"] in ex:
            conv = ex[f["conversations"]]
            if isinstance(conv, dict):
                conv = [{"from": _text(a), "value": _text(b)}
                        for a, b in zip(conv.get("from", []), conv.get("value", []), strict=False)]
            else:
                try:
                    conv = json.loads(_text(conv))
                except json.JSONDecodeError as e:
                    raise SkipSample("malformed_json", f"conversations are not JSON: {e}"
                                     ) from None
        elif f["caption"] in ex:
            conv = [{"from": "human", "value": self.spec.caption_prompt},
                    {"from": "gpt", "value": _text(ex[f["caption"]])}]
        elif f["question"] in ex and f["answer"] in ex:
            conv = [{"from": "human", "value": _text(ex[f["question"]])},
                    {"from": "gpt", "value": _text(ex[f["answer"]])}]
        else:
            raise SkipSample("malformed_json", f"record has none of the features "
                                               f"{f['conversations']!r}, {f['caption']!r}, "
                                               f"{f['question']!r}+{f['answer']!r}")
        return Record(conversations=conv, images=images, source=self.name, line=index + 1)


def open_source(spec: DatasetSpec) -> RecordSource:
    if spec.format == "jsonl":
        return JsonlSource(spec)
    if spec.format == "array_record":
        return ArrayRecordSource(spec)
    return TfdsSource(spec)


class Mixture:
    """All datasets of a stage as one index space, each repeated `repeat_time` times.

    repeat_time r contributes floor(r * len) entries: whole copies, then (like InternVL for
    r < 1) a prefix of the dataset for the fractional part.
    """

    def __init__(self, sources: Sequence[RecordSource]):
        if not sources:
            raise DataError("no datasets to read")
        self.sources = list(sources)
        self.counts = [math.floor(s.spec.repeat_time * len(s)) for s in self.sources]
        for s, c in zip(self.sources, self.counts, strict=True):
            if c == 0:
                log.warning("dataset %r contributes no samples (%d records x repeat_time %s)",
                            s.name, len(s), s.spec.repeat_time)
        self._ends = np.cumsum(self.counts)
        if self._ends[-1] == 0:
            raise DataError("the datasets hold no records")

    def __len__(self) -> int:
        return int(self._ends[-1])

    def locate(self, index: int) -> tuple[int, int]:
        """(source number, record index) of a mixture index."""
        d = int(np.searchsorted(self._ends, index, side="right"))
        start = int(self._ends[d - 1]) if d else 0
        return d, (index - start) % len(self.sources[d])

