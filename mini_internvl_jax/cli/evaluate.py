"""Evaluate a checkpoint on a benchmark: `--task` picks the prompt, scorer and input fields.

  mivl-eval --checkpoint DIR --task docvqa --data docvqa_val.parquet --out runs/docvqa.json
  mivl-eval --checkpoint DIR --task all --data-dir benchmarks/ --out runs/eval/

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

from mini_internvl_jax.checkpoints.resolve import open_source
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
from mini_internvl_jax.infer import eval_runner, eval_suite
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
    p.add_argument("--task", required=True, choices=sorted(TASKS) + ["all"],
                   help="a benchmark, or all: every benchmark file in --data-dir")
    p.add_argument("--data", metavar="PATH",
                   help="benchmark file (.jsonl, .json, .tsv, .parquet) or a folder of "
                        "parquet shards; the layout (official JSON, HF parquet, VLMEvalKit "
                        "TSV) is detected and printed")
    p.add_argument("--data-dir", metavar="DIR",
                   help="--task all: a folder of benchmark files named as released "
                        "(DocVQA_VAL.tsv, MMBench_DEV_EN.tsv, ...); results go to --out "
                        "(a folder, default eval_results/) with suite.json, and one table "
                        "beside the model card's numbers is printed")
    p.add_argument("--published", choices=sorted(eval_suite.PUBLISHED),
                   help="--task all: the card whose numbers to print beside the scores "
                        "(default: the one whose architecture the checkpoint has)")
    p.add_argument("--skip-missing-images", action="store_true",
                   help="skip (and count) rows whose image file is missing instead of "
                        "stopping with an error naming the row")
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
                               pad_token_id=rt.tokenizer.pad_id,
                               vocab_size=rt.tokenizer.vocab_size)
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


def _progress(task_name: str):
    def start(total: int, done: int):
        bar = tqdm(total=total, initial=done, unit="item", desc=task_name, file=sys.stderr)
        return bar.update
    return start


def _answer_factory(args, runtime: list):
    """Loads the model on first use (a finished run only rescores) and shares it."""
    def make(task):
        if not runtime:
            runtime.append(load_runtime(args, args.overrides, default_max_num=6))
        rt = runtime[0]
        mult = batch_shards(rt.generator.mesh)
        batch = -(-args.batch_size // mult) * mult
        return make_answer_fn(rt, args.max_new_tokens or task.max_new_tokens, batch), batch
    return make


def _check_args(args) -> None:
    # numbers and the TensorBoard folder before any work whose results they would hold
    eval_runner.check_eval_args(batch_size=args.batch_size, limit=args.limit,
                                tensorboard=args.tensorboard,
                                tensorboard_step=args.tensorboard_step)
    for flag, value in (("--data", args.data), ("--data-dir", args.data_dir),
                        ("--image-root", args.image_root), ("--out", args.out)):
        if value is not None and is_remote(value):
            raise UsageError(f"{flag} {value}: evaluation reads and writes local files (its "
                             "predictions file is appended to after every batch); copy them "
                             "from or to the store around the run (--checkpoint and "
                             "--tokenizer may be gs:// URIs)")
    if args.task == "all" and (args.data_dir is None or args.data is not None):
        raise UsageError("--task all takes --data-dir DIR (a folder of benchmark files), not "
                         "--data")
    if args.task != "all" and (args.data is None or args.data_dir is not None):
        raise UsageError(f"--task {args.task} takes --data FILE (--data-dir is for --task all)")


def _run_all(args, make, runtime: list) -> int:
    benches, ignored = eval_suite.discover(args.data_dir)
    for p in ignored:
        print(f"note: {p} is no benchmark file this suite knows; skipped", file=sys.stderr)
    if not benches:
        raise eval_runner.EvalDataError(f"{args.data_dir} holds no benchmark file named after "
                                        f"a task ({', '.join(eval_suite.ALIASES)})")
    out_dir = Path(args.out or "eval_results")
    results = []
    for b in benches:
        out = out_dir / f"{b.path.stem}.{b.task.name}.json"
        _, _, summary = eval_runner.evaluate_file(
            b.task, b.path, out, make, image_root=args.image_root,
            settings={"circular": args.circular}, limit=args.limit,
            skip_missing=args.skip_missing_images, meta={"checkpoint": str(args.checkpoint)},
            progress=_progress(b.path.name))
        print(f"{b.path.name} ({summary['layout']}): {b.task.name} "
              f"{summary['headline']} {summary['metrics'][summary['headline']]:.2f}",
              file=sys.stderr)
        results.append((b, summary))
    model = args.published or eval_suite.published_model(
        runtime[0].generator.cfg if runtime else open_source(args.checkpoint).model_config)
    rows = eval_suite.suite_rows(results, model)
    eval_runner.write_results(out_dir / "suite.json", {"model": model, "benchmarks": rows}, [])
    if args.tensorboard:
        log_suite_to_tensorboard(args.tensorboard, rows, args.tensorboard_step)
    print(f"published numbers: {model or 'none (unknown model; --published NAME)'}")
    print(eval_suite.format_suite_table(rows))
    return ExitCode.OK


def log_suite_to_tensorboard(log_dir: str, rows: list[dict], step: int) -> None:
    """Each benchmark's headline as `eval/FILE_STEM/METRIC` (published beside it as
    `eval/FILE_STEM/published`), and the whole table as text `eval/suite`."""
    tb = open_tensorboard(log_dir)
    try:
        for r in rows:
            stem = Path(r["file"]).stem
            tb.add_scalar(f"eval/{stem}/{r['metric']}", r["score"], step)
            if r["published"] is not None:
                tb.add_scalar(f"eval/{stem}/published", r["published"], step)
        keys = ["task", "file", "layout", "items", "metric", "score", "published",
                "published_split", "delta"]
        tb.add_text("eval/suite", markdown_table(keys, [[r[k] for k in keys] for r in rows]),
                    step)
    finally:
        tb.close()


@command
def main(argv: list[str]) -> int:
    args = parse_args(build_parser(), argv)
    _check_args(args)
    runtime: list = []
    make = _answer_factory(args, runtime)
    if args.task == "all":
        return _run_all(args, make, runtime)
    task = TASKS[args.task]
    out = Path(args.out or f"{Path(args.data).stem}.{task.name}.json")
    bench, records, summary = eval_runner.evaluate_file(
        task, args.data, out, make, image_root=args.image_root,
        settings={"circular": args.circular}, limit=args.limit,
        skip_missing=args.skip_missing_images, meta={"checkpoint": str(args.checkpoint)},
        progress=_progress(task.name))
    if bench.skipped:
        print(f"note: {len(bench.skipped)} row(s) skipped for a missing image, first: "
              f"{bench.skipped[0]}", file=sys.stderr)
    if args.tensorboard:
        log_to_tensorboard(args.tensorboard, summary, bench.items, records,
                           args.tensorboard_step)
    print(f"{args.data}: read as {summary['layout']}", file=sys.stderr)
    print(eval_runner.format_table(summary))
    print(json.dumps({"task": task.name, task.headline: summary["metrics"][task.headline],
                      "results": str(out)}))
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
