"""`mivl-export RUN_DIR OUT_DIR`: a training run's checkpoint (LoRA merged) as a converted folder.

OUT_DIR gets the converter's layout (model_config.json + params/ + tokenizer files), so chat,
evaluate and `mivl-convert --from-orbax OUT_DIR --to-hf ...` read it like any converted folder.
"""

from __future__ import annotations

import argparse
import sys

from etils import epath

from mini_internvl_jax.checkpoints.export import export_checkpoint
from mini_internvl_jax.cli._shell import ExitCode, command, parse_args


@command
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mivl-export", description=__doc__.split("\n\n")[0])
    p.add_argument("run_dir", help="checkpoint.dir of a training run")
    p.add_argument("out_dir")
    p.add_argument("--step", type=int, help="default: the latest step")
    p.add_argument("--overwrite", action="store_true")
    a = parse_args(p, argv)
    if epath.Path(a.out_dir).exists() and not a.overwrite:  # before the model is read
        raise FileExistsError(f"{a.out_dir} already exists; choose a new path or pass "
                              "--overwrite")
    out = export_checkpoint(a.run_dir, a.out_dir, step=a.step, overwrite=a.overwrite)
    print(f"wrote {out}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
