"""`mivl-train --config PRESET_OR_YAML [key=value ...] [--aot-tpu TOPOLOGY [--num-slices N]]`.

Exit codes: 0 finished (total_steps reached, or a finite dataset ran out: final checkpoint
saved); 2 a config, data or checkpoint problem (one line on stderr); 3 training diverged;
143 / 130 stopped by SIGTERM / Ctrl-C (checkpoint saved at the step boundary, or, after a
second signal or `checkpoint.stop_grace_s` without a step boundary, the process ends without
saving and the last checkpoint stays).
"""

from __future__ import annotations

import argparse
import signal
import sys

import jax

from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.errors import EXIT_USER_ERROR, report_user_error
from mini_internvl_jax.train.aot import compile_for_topology, format_report, resolve_remat
from mini_internvl_jax.train.cluster import multihost_reason
from mini_internvl_jax.train.config import load_train_config
from mini_internvl_jax.train.stopping import exit_code
from mini_internvl_jax.train.trainer import TrainingDivergedError, run


def maybe_initialize_distributed(mode: str, args: argparse.Namespace) -> None:
    """jax.distributed.initialize() for multi-host runs; must run before any JAX computation."""
    if args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif mode == "on" or (mode == "auto" and multihost_reason() is not None):
        jax.distributed.initialize()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mivl-train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="training preset name (demo, stage1, stage2, lora, ...) or a YAML path")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. optim.lr=1e-5")
    p.add_argument("--aot-tpu", metavar="TOPOLOGY",
                   help="compile the training step for a TPU topology (e.g. v5e:2x2) on this "
                        "machine and print its memory and FLOPs; nothing runs")
    p.add_argument("--num-slices", type=int, default=1, metavar="N",
                   help="with --aot-tpu: compile for N such slices joined by DCN (mesh.dcn, "
                        "default data parallel over the slices) and print the bytes of "
                        "collectives that cross slices")
    p.add_argument("--coordinator", help="host:port of process 0 (manual multi-process start)")
    p.add_argument("--num-processes", type=int)
    p.add_argument("--process-id", type=int)
    p.add_argument("--allow-config-change", action="store_true",
                   help="resume even though optim.lr, batch_size or the dataset differ from the "
                        "checkpoint's run (the change is printed and recorded)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR
    if args.aot_tpu:
        try:
            print(format_report(compile_for_topology(cfg, args.aot_tpu, args.num_slices)))
        except (ConfigError, RuntimeError) as e:
            print(f"AOT compile failed: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
        return 0
    if args.num_slices != 1:
        print("--num-slices only applies with --aot-tpu (a real run finds its slices from "
              "the devices; set mesh.dcn)", file=sys.stderr)
        return EXIT_USER_ERROR
    maybe_initialize_distributed(cfg.distributed, args)
    try:
        cfg = resolve_remat(cfg)  # remat auto: compile, keep the first policy that fits
        result = run(cfg, allow_config_change=args.allow_config_change)
    except KeyboardInterrupt:  # Ctrl-C before the step loop: nothing to save yet
        print("interrupted before training started; nothing saved", file=sys.stderr)
        return exit_code(signal.SIGINT)
    except TrainingDivergedError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    except Exception as e:  # noqa: BLE001 - bugs are re-raised there
        return report_user_error(e)
    if result.stopped == "preempted":
        saved = "checkpoint saved" if cfg.checkpoint.dir else "no checkpoint.dir: nothing saved"
        signum = result.stop_signal or signal.SIGTERM
        print(f"stopped by {signal.Signals(signum).name} at step {result.final_step}; {saved}",
              flush=True)
        return exit_code(signum)
    return 0


if __name__ == "__main__":
    sys.exit(main())
