"""Evaluate a checkpoint on ChartQA, MMBench-style multiple choice or VQA (JSONL in).

  mivl-eval --checkpoint DIR --task chartqa --data test.jsonl

Writes one prediction record per request (JSONL) and the overall scores (JSON), and prints the
scores. Input format and prompts: `mini_internvl_jax/infer/evaluation.py`; scoring rules:
`mini_internvl_jax/infer/scoring.py`. Decoding is greedy, as in InternVL's eval scripts.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from mini_internvl_jax.errors import UserError, user_error
from mini_internvl_jax.infer import evaluation
from mini_internvl_jax.infer.generate import GenerationConfig
from mini_internvl_jax.infer.runtime import Runtime, add_model_args, load_runtime
from mini_internvl_jax.train.metrics import markdown_table, open_tensorboard

TABLE_ROWS = 50  # predictions shown in TensorBoard's text tab (all of them are in --out)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mivl-eval",
                                description=__doc__.split("\n")[0])
    add_model_args(p)
    p.add_argument("--task", required=True, choices=evaluation.TASKS)
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL with one item a line")
    p.add_argument("--image-root", metavar="DIR",
                   help="folder image paths are relative to (default: the data file's)")
    p.add_argument("--out", metavar="FILE",
                   help="predictions JSONL (default: DATA_STEM.TASK.predictions.jsonl in the "
                        "current folder); scores go next to it as .score.json")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--no-circular", dest="circular", action="store_false",
                   help="mmbench: ask each question once instead of once per rotation")
    p.add_argument("--limit", type=int, default=None, help="first N items only")
    p.add_argument("--tensorboard", metavar="DIR",
                   help="also write the scores (scalars and a table) and the first "
                        f"{TABLE_ROWS} predictions (a table) as TensorBoard events into DIR")
    p.add_argument("--tensorboard-step", type=int, default=0, metavar="N",
                   help="step to log at, e.g. the checkpoint's training step (default 0)")
    return p


def log_to_tensorboard(log_dir: str, task: str, summary: dict, records: list[dict],
                       step: int) -> None:
    """Scores as scalars `eval/TASK/NAME` plus markdown tables of scores and predictions."""
    scores = {k: v for k, v in summary.items()
              if isinstance(v, (int, float)) and not isinstance(v, bool)}
    tb = open_tensorboard(log_dir)
    try:
        for k, v in scores.items():
            tb.add_scalar(f"eval/{task}/{k}", v, step)
        tb.add_text(f"eval/{task}/scores", markdown_table(["metric", "value"],
                                                          [[k, v] for k, v in scores.items()]),
                    step)
        if records:
            header = list(records[0])
            rows = [[r.get(k, "") for k in header] for r in records[:TABLE_ROWS]]
            tb.add_text(f"eval/{task}/predictions", markdown_table(header, rows), step)
    finally:
        tb.close()


def make_answer_fn(rt: Runtime, max_new_tokens: int, batch_size: int):
    """Greedy answers for a batch of requests; batches are padded to a fixed size."""

    def answer(requests):
        prompts, stops = [], None
        for r in requests:
            try:
                prompt, stops = rt.prompt(r.images, r.question)
            except ValueError as e:
                raise ValueError(f"item {r.item_id!r}: {e}") from None
            prompts.append(prompt)
        gen = GenerationConfig(max_new_tokens, stop_token_ids=stops,
                               pad_token_id=rt.tokenizer.pad_id)
        outs = rt.generator.generate(prompts, gen, batch_size=batch_size)
        return [rt.decode(ids, stops) for ids in outs]

    return answer


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.batch_size < 1:
        print("error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    out = Path(args.out or f"{Path(args.data).stem}.{args.task}.predictions.jsonl")
    score_path = out.with_name(out.name.removesuffix(".jsonl") + ".score.json")
    try:
        requests = evaluation.build_requests(args.task, args.data, image_root=args.image_root,
                                             circular=args.circular)
        if args.limit is not None:
            keep = set(list_ids(requests)[:args.limit])
            requests = [r for r in requests if r.item_id in keep]
        evaluation.check_images(requests)
        rt = load_runtime(args, default_max_num=6)
    except (UserError, ValueError, OSError) as e:
        print(f"error: {user_error(e) or e}", file=sys.stderr)
        return 2
    answer = make_answer_fn(rt, args.max_new_tokens or 100, args.batch_size)
    start = time.perf_counter()

    def progress(done: int, total: int) -> None:
        rate = done / (time.perf_counter() - start)
        print(f"\r{done}/{total} requests ({rate:.2f}/s)", end="", file=sys.stderr, flush=True)

    try:
        records, summary = evaluation.run_evaluation(args.task, requests, answer,
                                                     batch_size=args.batch_size,
                                                     progress=progress)
    except ValueError as e:
        print(f"\nerror: {e}", file=sys.stderr)
        return 2
    print(file=sys.stderr)
    summary.update(checkpoint=str(args.checkpoint), data=str(args.data),
                   predictions=str(out))
    try:
        evaluation.write_results(records, summary, out, score_path)
    except OSError as e:
        print(f"error: {user_error(e) or e}", file=sys.stderr)
        return 2
    if args.tensorboard:
        log_to_tensorboard(args.tensorboard, args.task, summary, records, args.tensorboard_step)
    print(json.dumps(summary, indent=2))
    return 0


def list_ids(requests) -> list[str]:
    """Item ids in first-appearance order (rotations of one item share an id)."""
    return list(dict.fromkeys(r.item_id for r in requests))


if __name__ == "__main__":
    sys.exit(main())
