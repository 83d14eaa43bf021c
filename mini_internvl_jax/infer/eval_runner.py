"""Resumable benchmark evaluation: items -> batched greedy generation -> scores.

Predictions go to `RESULTS.predictions.jsonl` next to the results JSON, one line per item,
flushed and fsynced after every batch. A rerun with the same `--out` reads that file, skips
the items it holds and generates only the rest; a torn last line (a crash mid-write) is
dropped, anything else unexpected (an id the data does not have, a different prompt, task or
media: image names, embedded images by hash, videos and their frame counts) is an error rather
than a silent overwrite, so finished work is never discarded. Scores are recomputed from all
predictions at the end, so a rerun with every item done only rescores.

Every pending item's images are opened and decoded (a video: its first frame) before the model
is loaded, so a bad file fails the run at once instead of hours in. Items with several images or
a video need nothing else here: `prepare_chat_inputs` prompts them `Image-1: <image>`... /
`Frame1: <image>`... and shares the tile budget, as in chat. Batches are padded to a multiple
of the mesh's data x fsdp size; the generator shards batch rows over those axes.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mini_internvl_jax.data.errors import SkipSample
from mini_internvl_jax.data.media import num_placeholders
from mini_internvl_jax.data.processing import decode_rgb, open_image
from mini_internvl_jax.data.templates import IMAGE_PLACEHOLDER
from mini_internvl_jax.data.video import VideoRef, read_frames
from mini_internvl_jax.fileio import check_creatable, write_atomic
from mini_internvl_jax.infer.eval_data import (
    EvalDataError,
    MissingImageError,
    layout_of,
    read_rows,
)
from mini_internvl_jax.infer.scorers.tasks import Item, Task


def check_eval_args(*, batch_size: int, limit: int | None, tensorboard: str | None,
                    tensorboard_step: int) -> None:
    """Refuses numbers out of range (EvalDataError, naming the flag and the bound) and a
    TensorBoard folder that cannot be written (OSError naming it), before anything runs."""
    for flag, value, low in (("--batch-size", batch_size, 1), ("--limit", limit, 1),
                             ("--tensorboard-step", tensorboard_step, 0)):
        if value is not None and value < low:
            raise EvalDataError(f"{flag} must be >= {low}, got {value}")
    if tensorboard is not None:
        check_creatable(tensorboard)


@dataclass(frozen=True)
class Benchmark:
    """A benchmark file's items, the layout it was read as, and the rows skipped for a missing
    image (only with `skip_missing`), each as "FILE:ROW: message"."""

    items: list[Item]
    layout: str
    skipped: list[str]


def load_benchmark(task: Task, data: str | Path, *, image_root: str | Path | None = None,
                   settings: dict | None = None, limit: int | None = None,
                   skip_missing: bool = False) -> Benchmark:
    """All items of a benchmark file (the first `limit` rows only, if given). A row whose image
    file is missing is an error, or with `skip_missing` a counted skip."""
    root = Path(image_root) if image_root is not None else Path(data)
    root = root if root.is_dir() else root.parent
    rows = read_rows(data)
    layout = layout_of(data)
    if limit is not None:
        rows = rows[:limit]
    settings = {**(settings or {}), "layout": layout, "file": Path(data).name}
    if task.scan is not None:
        settings.update(task.scan([r for _, r in rows]))
    items: list[Item] = []
    skipped: list[str] = []
    seen: dict[str, str] = {}
    for where, row in rows:
        try:
            built = task.build(row, where, root, settings)
        except MissingImageError as e:
            if not skip_missing:
                raise
            skipped.append(str(e))
            continue
        for item in built:
            if item.id in seen:
                raise EvalDataError(f"{where}: duplicate id {item.id!r} (first at "
                                    f"{seen[item.id]})")
            seen[item.id] = where
            _check_placeholders(item, where)
            items.append(item)
    if not items:
        raise EvalDataError(f"{data}: no {task.name} items" + (
            f" ({len(skipped)} rows skipped for missing images)" if skipped else ""))
    return Benchmark(items, layout, skipped)


def build_items(task: Task, data: str | Path, **kw) -> list[Item]:
    """The items of `load_benchmark`."""
    return load_benchmark(task, data, **kw).items


def _check_placeholders(item: Item, where: str) -> None:
    """A question with its own `<image>`s needs one per image and video frame (none: the
    placeholder lines are added); caught here, not after the model has loaded."""
    n, need = item.prompt.count(IMAGE_PLACEHOLDER), num_placeholders(item.images)
    if n and n != need:
        raise EvalDataError(f"{where}: the question holds {n} {IMAGE_PLACEHOLDER} placeholder(s) "
                            f"for {need} (one per image and per video frame)")


def predictions_path(results: str | Path) -> Path:
    results = Path(results)
    return results.with_name(results.name.removesuffix(".json") + ".predictions.jsonl")


def load_predictions(path: Path, task: Task, items: Sequence[Item]) -> dict[str, str]:
    """id -> prediction already in `path`; drops a torn last line, rejects foreign records."""
    if not path.exists():
        return {}
    raw = path.read_bytes()
    lines = raw.split(b"\n")
    if lines[-1]:  # no newline at the end: the last write was cut off
        os.truncate(path, len(raw) - len(lines[-1]))
    by_id = {it.id: it for it in items}
    done: dict[str, str] = {}
    for n, line in enumerate(lines[:-1], 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            rid, pred = str(rec["id"]), rec["prediction"]
        except (json.JSONDecodeError, KeyError, TypeError):
            raise EvalDataError(f"{path}:{n}: not a prediction record; fix or move the file "
                                "(it is never overwritten)") from None
        if rec.get("task") != task.name or rid not in by_id:
            raise EvalDataError(f"{path}:{n}: record {rid!r} of task {rec.get('task')!r} is not "
                                f"an item of this {task.name} data; use another --out")
        if rec.get("prompt") != by_id[rid].prompt:
            raise EvalDataError(f"{path}:{n}: item {rid!r} was generated with a different "
                                "prompt; use another --out")
        if "media" in rec and rec["media"] != media(by_id[rid]):  # older records lack it
            raise EvalDataError(f"{path}:{n}: item {rid!r} was generated with other images or "
                                f"video frames ({rec['media']}); use another --out")
        done[rid] = pred
    return done


def media(item: Item) -> list[str]:
    """What the model sees besides the prompt, as recorded with a prediction: file names (not
    whole paths, so a moved `--image-root` still resumes), embedded data by hash, and each
    video's frame count."""
    out = []
    for ref in item.images:
        src = ref.source if isinstance(ref, VideoRef) else ref
        name = ("sha1:" + hashlib.sha1(src).hexdigest() if isinstance(src, bytes)
                else os.path.basename(str(src)))
        out.append(f"video {name} x{ref.num_frames}" if isinstance(ref, VideoRef) else name)
    return out


def check_images(items: Sequence[Item]) -> None:
    """Opens and decodes every image of `items` and the first frame of every video; one error
    lists the first bad ones."""
    bad = []
    for it in items:
        for ref in it.images:
            try:
                if isinstance(ref, VideoRef):
                    read_frames(ref.source, lambda n, fps: [0])
                else:
                    decode_rgb(open_image(ref))
            except (SkipSample, ValueError) as e:  # VideoError is a ValueError
                bad.append(f"item {it.id!r}: {e}")
                break
    if bad:
        more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
        raise EvalDataError(f"{len(bad)} item(s) have unreadable images or videos{more}: "
                            + "; ".join(bad[:5]))


def generate_all(task: Task, pending: Sequence[Item], path: Path,
                 answer: Callable[[Sequence[Item]], list[str]], batch_size: int,
                 progress=None) -> None:
    """Answers `pending` in batches, appending each batch's records to `path` durably."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        for start in range(0, len(pending), batch_size):
            batch = pending[start:start + batch_size]
            preds = answer(batch)
            if len(preds) != len(batch):
                raise RuntimeError(f"{len(preds)} predictions for {len(batch)} items")
            f.write("".join(json.dumps({"id": it.id, "task": task.name, "prompt": it.prompt,
                                        "media": media(it), "prediction": p},
                                       ensure_ascii=False) + "\n"
                            for it, p in zip(batch, preds, strict=True)))
            f.flush()
            os.fsync(f.fileno())
            if progress is not None:
                progress(len(batch))


def score_all(task: Task, items: Sequence[Item], predictions: dict[str, str]
              ) -> tuple[list[dict], dict]:
    records = []
    for it in items:
        rec = {"id": it.id, "prediction": predictions[it.id]}
        rec.update(task.score(it.ref, predictions[it.id]))
        records.append(rec)
    summary = task.summarize(records)
    return records, {"task": task.name, "metric": task.metric, "headline": task.headline,
                     "num_items": len(items), **summary}


def format_table(summary: dict) -> str:
    """Overall metrics, then one row per category, as an aligned plain-text table."""
    rows = [("overall", summary["metrics"])] + list(summary.get("categories", {}).items())
    cols = list(dict.fromkeys(k for _, m in rows for k in m))

    def cell(v):
        if isinstance(v, float):
            return f"{v:.2f}"
        return "" if v is None else str(v)

    table = [["category"] + cols] + [[name] + [cell(m.get(c)) for c in cols] for name, m in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                       for i, (c, w) in enumerate(zip(r, widths, strict=True))) for r in table]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def write_results(path: str | Path, summary: dict, records: Sequence[dict]) -> None:
    write_atomic(path, json.dumps({**summary, "items": list(records)}, indent=1,
                                  ensure_ascii=False) + "\n")


AnswerFactory = Callable[[Task], tuple[Callable[[Sequence[Item]], list[str]], int]]


def evaluate_file(task: Task, data: str | Path, out: str | Path, make_answer: AnswerFactory,
                  *, image_root: str | Path | None = None, settings: dict | None = None,
                  limit: int | None = None, skip_missing: bool = False,
                  meta: dict | None = None,
                  progress: Callable[[int, int], Callable[[int], object]] | None = None,
                  ) -> tuple[Benchmark, list[dict], dict]:
    """One benchmark file end to end: items, resume from OUT's predictions, generation of the
    rest (`make_answer(task)` -> (answer function, batch size), called only when something is
    pending, so a finished run needs no model), scores written atomically to `out`. `meta`
    (e.g. the checkpoint) goes into the summary; `progress(total, done)` returns a callback
    taking the count of each finished batch."""
    bench = load_benchmark(task, data, image_root=image_root, settings=settings, limit=limit,
                           skip_missing=skip_missing)
    preds_path = predictions_path(out)
    done = load_predictions(preds_path, task, bench.items)
    pending = [it for it in bench.items if it.id not in done]
    check_images(pending)
    if pending:
        answer, batch = make_answer(task)
        tick = progress(len(bench.items), len(bench.items) - len(pending)) if progress else None
        generate_all(task, pending, preds_path, answer, batch, progress=tick)
        done = load_predictions(preds_path, task, bench.items)
    records, summary = score_all(task, bench.items, done)
    summary.update(meta or {})
    summary.update(data=str(data), layout=bench.layout, predictions=str(preds_path),
                   skipped_rows=len(bench.skipped))
    if bench.skipped:
        summary["skipped"] = bench.skipped
    write_results(out, summary, records)
    return bench, records, summary
