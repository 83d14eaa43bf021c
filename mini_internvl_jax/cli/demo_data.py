"""`mivl-demo-data OUT_DIR`: write the synthetic demo dataset the `demo` training preset reads."""

from __future__ import annotations

import argparse
import sys

from mini_internvl_jax.cli._shell import ExitCode, command, parse_args
from mini_internvl_jax.tools.demo import write_demo


@command
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mivl-demo-data", description=__doc__.split("\n")[0])
    p.add_argument("out_dir")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-stage1", type=int, default=160)
    p.add_argument("--num-stage2", type=int, default=160)
    p.add_argument("--force", action="store_true", help="replace an earlier demo folder")
    args = parse_args(p, argv)
    for name in ("num_stage1", "num_stage2"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be >= 1")
    m = write_demo(args.out_dir, seed=args.seed, num_stage1=args.num_stage1,
                   num_stage2=args.num_stage2, force=args.force)
    print(f"wrote {args.out_dir}: {m['stage1']['samples']} stage-1 and "
          f"{m['stage2']['samples']} stage-2 samples, {m['images']} images, tokenizers "
          f"{sorted(m['tokenizers'])}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
