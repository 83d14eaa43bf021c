"""Every sample a training run would reject, found before the run spends pod time on it.

Each record goes through the pipeline's own per-sample processing (`SampleProcessor.process`:
structure, roles, `<image>` count, image decode, tile budget, token length) with the run's
settings, so what is reported here is exactly what the pipeline would skip. Samples the
pipeline would cut to fit (`overlong: truncate`) are listed separately: they train, shortened.
A shard folder's manifest is verified (sizes, record counts, sha256) before its records are read.
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import os
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from tqdm import tqdm

from mini_internvl_jax.config import TemplateName
from mini_internvl_jax.data.config import DataConfig
from mini_internvl_jax.data.errors import DataError, SkipSample
from mini_internvl_jax.data.preference import rejected_record
from mini_internvl_jax.data.processing import SampleProcessor
from mini_internvl_jax.data.shards import find_manifest, read_manifest, verify_shards
from mini_internvl_jax.data.sources import Mixture, RecordSource, open_source, read_meta
from mini_internvl_jax.data.tokenizer import Tokenizer, load_tokenizer

TRUNCATED = "truncated"
_BLOCK = 256  # records handed to the thread pool at a time (bounds memory on huge datasets)


@dataclass(frozen=True)
class Finding:
    dataset: str
    where: str  # `file:line` (JSONL) or `shard record n` (ArrayRecord)
    reason: str  # a pipeline skip reason (errors.BAD_REASONS / DROP_REASONS) or "truncated"
    detail: str

    def __str__(self) -> str:
        return f"{self.where}: {self.reason}: {self.detail}"


@dataclass
class ValidationReport:
    meta_path: str
    checked: int = 0
    rejected: list[Finding] = field(default_factory=list)
    truncated: list[Finding] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.rejected

    def counts(self) -> dict[str, int]:
        """Rejections per reason."""
        return dict(collections.Counter(f.reason for f in self.rejected))


def _records(sources: list[RecordSource]) -> Iterator[tuple[RecordSource, int]]:
    for src in sources:
        for i in range(len(src)):
            yield src, i


def validate_dataset(path: str | os.PathLike, data_cfg: DataConfig, *,
                     tokenizer: Tokenizer | str, image_size: int, num_image_tokens: int,
                     seq_len: int, max_tiles: int, template: TemplateName | None = None,
                     progress: bool = True) -> ValidationReport:
    """Checks every record of a meta JSON or a shard folder (or its manifest.json).

    The settings are the run's: `data_cfg` (its meta_path is replaced by `path`), the model's
    tile size and image tokens, and a host's micro-batch `seq_len` and tile buffer `max_tiles`.
    Raises `DataError` for what stops a run outright (unreadable meta, shard not matching its
    manifest); returns the per-sample findings otherwise.
    """
    if find_manifest(path) is not None:
        root, manifest = read_manifest(path)
        verify_shards(path, progress=progress)
        meta_path = str(root / manifest["meta"])
    else:
        meta_path = str(path)
    template = data_cfg.template or template
    if template is None:
        raise DataError("no chat template: set data.template or pass the model's template")
    cfg = dataclasses.replace(data_cfg, meta_path=meta_path, template=template)
    if isinstance(tokenizer, str):
        tokenizer = load_tokenizer(tokenizer)
    sources = [open_source(s) for s in read_meta(meta_path)]
    processor = SampleProcessor(cfg, Mixture(sources), tokenizer, image_size=image_size,
                                num_image_tokens=num_image_tokens, seq_len=seq_len,
                                max_tiles=max_tiles, seed=0)
    # No JPEG re-encoding: it cannot reject a sample and only costs time here.
    specs = {id(s): dataclasses.replace(s.spec, data_augment=False) for s in sources}

    def check(job: tuple[RecordSource, int]) -> Finding | None:
        src, i = job
        try:
            rec = src.read(i)
            sample = processor.process(rec, specs[id(src)], 0)
            truncated = sample.truncated
            if rec.rejected is not None:  # a preference pair: its other answer too
                other = processor.process(rejected_record(rec), specs[id(src)], 0,
                                          reuse_tiles=(sample.tiles, sample.tile_flags))
                truncated = truncated or other.truncated
        except SkipSample as e:
            return Finding(src.name, src.where(i), e.reason, e.detail)
        if truncated:
            return Finding(src.name, src.where(i), TRUNCATED, f"cut to seq_len {seq_len}")
        return None

    report = ValidationReport(meta_path)
    jobs = _records(sources)
    total = sum(len(s) for s in sources)
    with ThreadPoolExecutor(max(1, cfg.num_threads)) as pool, \
            tqdm(total=total, desc="validating", unit="rec", disable=not progress) as bar:
        while block := list(itertools.islice(jobs, _BLOCK)):
            for found in pool.map(check, block):
                if found is not None:
                    (report.truncated if found.reason == TRUNCATED
                     else report.rejected).append(found)
            report.checked += len(block)
            bar.update(len(block))
            bar.set_postfix(rejected=len(report.rejected))
    return report
