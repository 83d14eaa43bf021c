"""Batch evaluation: JSONL items -> chat requests -> predictions -> per-item and overall scores.

Input lines (one JSON object each; `id` defaults to the line number; `image` is a path relative
to the image root, a list of paths, or absent for text-only items):
  chartqa, vqa: {"id", "image", "question", "answer": str | [str]} (`answers` also accepted)
  mmbench:      {"id", "image", "question", "options": {"A": ..} | [..], "answer": "B",
                 "hint"?, "lang"?: "en" | "cn"}
Prompts follow InternVL's eval scripts: ChartQA and VQA append "Answer the question using a
single word or phrase."; MMBench uses `scoring.mmbench_question`, once per rotation of the
options when circular evaluation is on.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from mini_internvl_jax.data.errors import SkipSample
from mini_internvl_jax.data.processing import decode_rgb, open_image
from mini_internvl_jax.errors import UserError
from mini_internvl_jax.fileio import write_atomic
from mini_internvl_jax.infer import scoring

TASKS = ("chartqa", "mmbench", "vqa")
SHORT_ANSWER = "Answer the question using a single word or phrase."


class EvalDataError(UserError, ValueError):
    """A malformed evaluation file; the message names the file, line and field."""


@dataclass(frozen=True)
class Request:
    item_id: str
    question: str  # the full prompt text sent to the model
    images: tuple[str, ...]
    reference: str | tuple[str, ...]  # answers (chartqa, vqa) or the answer letter (mmbench)
    options: tuple[str, ...] = ()
    rotation: int = 0


def read_jsonl(path: str | Path) -> list[tuple[int, dict]]:
    path = Path(path)
    if not path.is_file():
        raise EvalDataError(f"evaluation file {path} does not exist")
    items = []
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
            items.append((n, obj))
    if not items:
        raise EvalDataError(f"{path} holds no items")
    return items


def _field(obj: dict, name: str, where: str, kinds: tuple[type, ...]):
    if name not in obj:
        raise EvalDataError(f"{where}: missing field {name!r}")
    value = obj[name]
    if not isinstance(value, kinds) or (isinstance(value, (str, list, dict)) and not value):
        raise EvalDataError(f"{where}: field {name!r} must be a non-empty "
                            f"{' or '.join(k.__name__ for k in kinds)}, got {value!r}")
    return value


def _images(obj: dict, root: Path, where: str) -> tuple[str, ...]:
    ref = obj.get("image")
    if ref is None:
        return ()
    refs = [ref] if isinstance(ref, str) else ref
    if not isinstance(refs, list) or not all(isinstance(r, str) and r for r in refs):
        raise EvalDataError(f"{where}: field 'image' must be a path or a list of paths")
    return tuple(str(root / r) for r in refs)


def _answers(obj: dict, where: str) -> tuple[str, ...]:
    name = "answers" if "answers" in obj else "answer"
    value = _field(obj, name, where, (str, list))
    answers = (value,) if isinstance(value, str) else tuple(value)
    if not all(isinstance(a, str) for a in answers):
        raise EvalDataError(f"{where}: field {name!r} must hold strings")
    return answers


def build_requests(task: str, path: str | Path, *, image_root: str | Path | None = None,
                   circular: bool = True) -> list[Request]:
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; expected one of {TASKS}")
    root = Path(image_root) if image_root is not None else Path(path).parent
    out: list[Request] = []
    seen: set[str] = set()
    for n, obj in read_jsonl(path):
        where = f"{path}:{n}"
        item_id = str(obj.get("id", n))
        if item_id in seen:
            raise EvalDataError(f"{where}: duplicate id {item_id!r}")
        seen.add(item_id)
        images = _images(obj, root, where)
        question = _field(obj, "question", where, (str,))
        if task != "mmbench":
            out.append(Request(item_id, f"{question} {SHORT_ANSWER}", images,
                               _answers(obj, where)))
            continue
        raw = _field(obj, "options", where, (dict, list))
        if isinstance(raw, dict):  # MMBench leaves unused letters empty
            raw = {k: v for k, v in raw.items() if v not in (None, "")}
        options = [raw[k] for k in sorted(raw)] if isinstance(raw, dict) else list(raw)
        if isinstance(raw, dict) and sorted(raw) != list(scoring.LETTERS[:len(raw)]):
            raise EvalDataError(f"{where}: option keys must be A, B, ... in order, got "
                                f"{sorted(raw)}")
        if not 2 <= len(options) <= len(scoring.LETTERS) or not all(
                isinstance(o, str) for o in options):
            raise EvalDataError(f"{where}: 'options' must hold 2 to {len(scoring.LETTERS)} "
                                "strings")
        answer = _field(obj, "answer", where, (str,)).strip().upper()
        if answer not in scoring.LETTERS[:len(options)]:
            raise EvalDataError(f"{where}: answer {answer!r} is not one of the "
                                f"{len(options)} option letters")
        lang = obj.get("lang", "en")
        if lang not in scoring.MMBENCH_PROMPT:
            raise EvalDataError(f"{where}: lang must be one of {sorted(scoring.MMBENCH_PROMPT)}")
        for shift in range(len(options) if circular else 1):
            opts, letter = scoring.rotate_options(options, answer, shift)
            prompt = scoring.mmbench_question(question, opts, obj.get("hint") or None, lang)
            out.append(Request(item_id, prompt, images, letter, tuple(opts), shift))
    return out


def check_images(requests: Sequence[Request], limit: int = 5) -> None:
    """Opens and decodes every request's images before any generation: one missing or
    damaged file otherwise stops the run after the model was loaded and some answers made."""
    bad: dict[str, str] = {}
    for r in requests:
        for path in r.images:
            if path in bad:
                continue
            try:
                decode_rgb(open_image(path), path)
            except SkipSample as e:
                bad[path] = f"item {r.item_id!r}: {e.detail}"
    if bad:
        shown = "; ".join(list(bad.values())[:limit])
        more = f" (and {len(bad) - limit} more)" if len(bad) > limit else ""
        raise EvalDataError(f"{len(bad)} image(s) cannot be read: {shown}{more}")


def score(task: str, req: Request, prediction: str) -> dict:
    rec: dict[str, object] = {"id": req.item_id, "question": req.question,
                              "prediction": prediction}
    if task == "mmbench":
        choice = scoring.extract_choice(prediction, req.options)
        rec.update(rotation=req.rotation, answer=req.reference, choice=choice,
                   correct=choice == req.reference)
    elif task == "chartqa":
        rec.update(answers=list(req.reference),
                   score=scoring.chartqa_score(prediction, req.reference),
                   score_internvl=scoring.chartqa_score(prediction, req.reference,
                                                        relative_to="prediction"))
    else:
        rec.update(answers=list(req.reference),
                   exact_match=scoring.vqa_exact_match(prediction, req.reference),
                   vqa_accuracy=scoring.vqa_accuracy(prediction, req.reference))
    return rec


def run_evaluation(task: str, requests: Sequence[Request],
                   answer: Callable[[Sequence[Request]], list[str]], *, batch_size: int,
                   progress: Callable[[int, int], None] | None = None
                   ) -> tuple[list[dict], dict]:
    """(per-request records, summary); `answer` maps a batch of requests to predictions."""
    records = []
    for start in range(0, len(requests), batch_size):
        batch = requests[start:start + batch_size]
        predictions = answer(batch)
        if len(predictions) != len(batch):
            raise RuntimeError(f"answer function returned {len(predictions)} predictions for "
                               f"{len(batch)} requests")
        records += [score(task, r, p) for r, p in zip(batch, predictions, strict=True)]
        if progress is not None:
            progress(len(records), len(requests))
    return records, scoring.summarize(task, records)


def write_results(records: Sequence[dict], summary: dict, predictions_path: str | Path,
                  score_path: str | Path) -> None:
    write_atomic(predictions_path, "".join(json.dumps(r, ensure_ascii=False) + "\n"
                                           for r in records))
    write_atomic(score_path, json.dumps(summary, indent=2) + "\n")
