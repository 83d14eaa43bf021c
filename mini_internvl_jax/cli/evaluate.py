"""Evaluate a checkpoint on a benchmark: `--task` picks the prompt, scorer and input fields.

  mivl-eval --checkpoint DIR --task docvqa --data docvqa_val.parquet --out runs/docvqa.json

Writes the results JSON (`--out`; overall metrics, per-category metrics, per-item scores) and
prints a per-category table. Predictions are appended to OUT.predictions.jsonl after every
batch; rerunning the same command continues where a crash or preemption stopped. Tasks,
metrics and input formats: `mini_internvl_jax/infer/scorers/tasks.py` and
docs/evaluation.md. Decoding is greedy, as in InternVL's eval scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from mini_internvl_jax.cli._shell import (
    MESH_HELP,
    ExitCode,
    UsageError,
    add_model_args,
    add_override_args,
    command,
    load_runtime,
    parse_args,
)
from mini_internvl_jax.data.errors import DataError
from mini_internvl_jax.fileio import is_remote
from mini_internvl_jax.infer import eval_runner
from mini_internvl_jax.infer.generate import GenerationConfig
from mini_internvl_jax.infer.runtime import Runtime
from mini_internvl_jax.infer.scorers.tasks import TASKS, Item
from mini_internvl_jax.sharding import batch_shards
from mini_internvl_jax.train.metrics import markdown_table, open_tensorboard

TABLE_ROWS = 50  # predictions shown in TensorBoard's text tab (all of them are in --out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mivl-eval", description=__doc__.split("\n")[0])
    add_model_args(p)
    add_override_args(p, MESH_HELP)
    p.add_argument("--task", required=True, choices=sorted(TASKS))
    p.add_argument("--data", required=True, metavar="PATH",
                   help="benchmark file (.jsonl, .json, .tsv, .parquet) or a folder of "
                        "parquet shards")
    p.add_argument("--image-root", metavar="DIR",
                   help="folder image and video paths are relative to (default: the data "
                        "file's)")
    p.add_argument("--out", metavar="FILE.json",
                   help="results JSON (default: DATA_STEM.TASK.json in the current folder); "
                        "predictions go next to it as FILE.predictions.jsonl")
    p.add_argument("--batch-size", type=int, default=8,
                   help="rows per generation batch (rounded up to a multiple of the shards "
                        "the mesh splits a batch into)")
    p.add_argument("--no-circular", dest="circular", action="store_false",
                   help="mmbench: ask each question once instead of once per rotation")
    p.add_argument("--limit", type=int, default=None, help="first N rows of the data only")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="also write the scores (overall scalars, a table with the categories) "
                        f"and the first {TABLE_ROWS} predictions (a table) as TensorBoard "
                        "events into DIR")
    p.add_argument("--tensorboard-step", type=int, default=0, metavar="N",
                   help="step to log at, e.g. the checkpoint's training step (default 0)")
    return p


def make_answer_fn(rt: Runtime, max_new_tokens: int, batch_size: int):
    """Greedy answers for a batch of items; batches are padded to a fixed row count."""

    def answer(items):
        prompts, stops = [], ()
        for it in items:
            try:
                prompt, stops = rt.prompt(it.images, it.prompt)
            except DataError as e:
                raise DataError(f"item {it.id!r}: {e}") from None
            prompts.append(prompt)
        gen = GenerationConfig(max_new_tokens, stop_token_ids=tuple(stops),
                               pad_token_id=rt.tokenizer.pad_id)
        outs = rt.generator.generate(prompts, gen, batch_size=batch_size)
        return [rt.decode(ids, stops) for ids in outs]

    return answer


def log_to_tensorboard(log_dir: str, summary: dict, items: Sequence[Item],
                       records: Sequence[dict], step: int) -> None:
    """Overall metrics as scalars `eval/TASK/METRIC`; markdown tables of the metrics (overall and
    per category) and of the first predictions with their prompts."""
    task = summary["task"]
    rows = [("overall", summary["metrics"])] + list(summary.get("categories", {}).items())
    cols = list(dict.fromkeys(k for _, m in rows for k in m))
    prompts = {it.id: it.prompt for it in items}
    shown = list(records[:TABLE_ROWS])
    fields = list(dict.fromkeys(k for r in shown for k in r if k != "id"))
    tb = open_tensorboard(log_dir)
    try:
        for k, v in summary["metrics"].items():
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                tb.add_scalar(f"eval/{task}/{k}", v, step)
        tb.add_text(f"eval/{task}/scores", markdown_table(
            ["category", *cols], [[name, *(m.get(c, "") for c in cols)] for name, m in rows]),
            step)
        if shown:
            tb.add_text(f"eval/{task}/predictions", markdown_table(
                ["id", "prompt", *fields],
                [[r["id"], prompts[r["id"]], *(r.get(k, "") for k in fields)] for r in shown]),
                step)
    finally:
        tb.close()


@command
def main(argv: list[str]) -> int:
    args = parse_args(build_parser(), argv)
    if args.batch_size < 1:
        raise UsageError("--batch-size must be >= 1")
    task = TASKS[args.task]
    for flag, value in (("--data", args.data), ("--image-root", args.image_root),
                        ("--out", args.out)):
        if value is not None and is_remote(value):
            raise UsageError(f"{flag} {value}: evaluation reads and writes local files (its "
                             "predictions file is appended to after every batch); copy them "
                             "from or to the store around the run (--checkpoint and "
                             "--tokenizer may be gs:// URIs)")
    out = Path(args.out or f"{Path(args.data).stem}.{task.name}.json")
    preds_path = eval_runner.predictions_path(out)
    items = eval_runner.build_items(task, args.data, image_root=args.image_root,
                                    settings={"circular": args.circular},
                                    limit=args.limit)
    done = eval_runner.load_predictions(preds_path, task, items)
    pending = [it for it in items if it.id not in done]
    eval_runner.check_images(pending)
    if pending:
        rt = load_runtime(args, args.overrides, default_max_num=6)
        mult = batch_shards(rt.generator.mesh)
        batch = -(-args.batch_size // mult) * mult
        answer = make_answer_fn(rt, args.max_new_tokens or task.max_new_tokens, batch)
        with tqdm(total=len(items), initial=len(items) - len(pending), unit="item",
                  desc=task.name, file=sys.stderr) as bar:
            eval_runner.generate_all(task, pending, preds_path, answer, batch,
                                     progress=bar.update)
        done = eval_runner.load_predictions(preds_path, task, items)
    records, summary = eval_runner.score_all(task, items, done)
    summary.update(checkpoint=str(args.checkpoint), data=str(args.data),
                   predictions=str(preds_path))
    eval_runner.write_results(out, summary, records)
    if args.tensorboard:
        log_to_tensorboard(args.tensorboard, summary, items, records, args.tensorboard_step)
    print(eval_runner.format_table(summary))
    print(json.dumps({"task": task.name, task.headline: summary["metrics"][task.headline],
                      "results": str(out)}))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
