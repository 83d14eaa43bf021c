"""`mivl-validate-data DATASET --config PRESET_OR_YAML [key=value ...]`: every sample of a meta
JSON or shard folder that the run would reject, with the reason; exit 1 if there is any."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys

from mini_internvl_jax.cli._shell import (
    ExitCode,
    UsageError,
    add_override_args,
    command,
    parse_args,
)
from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.data.validate import validate_dataset
from mini_internvl_jax.fileio import check_writable_file, write_atomic
from mini_internvl_jax.train.config import build_model_config, load_train_config


@command
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mivl-validate-data", description=__doc__.split("\n")[0])
    p.add_argument("dataset", help="meta JSON, shard folder or its manifest.json")
    p.add_argument("--config", default="stage2",
                   help="the run's training preset or YAML: its model, seq_len, max_tiles and "
                        "data settings decide what is rejected (default: stage2)")
    add_override_args(p, "seq_len=4096, as for mivl-train")
    p.add_argument("--tokenizer", help="tokenizer folder (default: the config's)")
    p.add_argument("--processes", type=int, default=1,
                   help="processes of the run: each host's tile buffer is max_tiles / this")
    p.add_argument("--report", help="also write the findings to this JSONL file")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parse_args(p, argv)
    overrides = list(args.overrides) + [f"data.meta_path={args.dataset}"]
    if args.tokenizer:
        overrides.append(f"tokenizer={args.tokenizer}")
    cfg = load_train_config(args.config, overrides)
    model_cfg = build_model_config(cfg)
    if cfg.data is None or cfg.tokenizer is None:
        raise ConfigError("the config needs a `data` section and a tokenizer")
    if args.processes < 1:
        raise UsageError(f"--processes must be >= 1, got {args.processes}")
    if cfg.max_tiles % args.processes:
        raise UsageError(f"max_tiles {cfg.max_tiles} is not a multiple of --processes "
                         f"{args.processes}")
    if args.report:  # before the validation whose findings it would hold
        check_writable_file(args.report)
    report = validate_dataset(
        args.dataset, cfg.data, tokenizer=cfg.tokenizer, template=model_cfg.template,
        image_size=model_cfg.vision.image_size, num_image_tokens=model_cfg.num_image_tokens,
        seq_len=cfg.seq_len, max_tiles=cfg.max_tiles // args.processes,
        progress=not args.no_progress)
    for f in report.rejected:
        print(f"REJECT {f}")
    for f in report.truncated:
        print(f"TRUNCATE {f}")
    if args.report:
        write_atomic(args.report, "".join(json.dumps(dataclasses.asdict(f)) + "\n"
                                          for f in report.rejected + report.truncated))
    counts = ", ".join(f"{k} {v}" for k, v in sorted(report.counts().items()))
    print(f"checked {report.checked} samples: {len(report.rejected)} rejected"
          + (f" ({counts})" if counts else "") + f", {len(report.truncated)} truncated")
    return ExitCode.OK if report.ok else ExitCode.FINDINGS


if __name__ == "__main__":
    sys.exit(main())
