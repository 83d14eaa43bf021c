"""`mivl-train --config PRESET_OR_YAML [key=value ...] [--aot-tpu TOPOLOGY [--num-slices N]]`."""

from __future__ import annotations

import argparse
import os
import sys

import jax

from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.data.errors import DataError
from mini_internvl_jax.train.aot import compile_for_topology, format_report
from mini_internvl_jax.train.checkpoint import CheckpointError
from mini_internvl_jax.train.config import load_train_config
from mini_internvl_jax.train.init_from import InitError
from mini_internvl_jax.train.trainer import TrainingDivergedError, run

_CLUSTER_ENV = ("SLURM_JOB_ID", "OMPI_COMM_WORLD_SIZE", "MEGASCALE_COORDINATOR_ADDRESS")


def _cluster_detected() -> bool:
    if any(k in os.environ for k in _CLUSTER_ENV):
        return True
    return "," in os.environ.get("TPU_WORKER_HOSTNAMES", "")  # a multi-host TPU slice


def maybe_initialize_distributed(mode: str, args: argparse.Namespace) -> None:
    """jax.distributed.initialize() for multi-host runs; must run before any JAX computation."""
    if args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif mode == "on" or (mode == "auto" and _cluster_detected()):
        jax.distributed.initialize()


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="mivl-train", description=__doc__)
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
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        cfg = load_train_config(args.config, args.overrides)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    if args.aot_tpu:
        try:
            print(format_report(compile_for_topology(cfg, args.aot_tpu, args.num_slices)))
        except (ConfigError, RuntimeError) as e:
            print(f"AOT compile failed: {e}", file=sys.stderr)
            return 2
        return 0
    if args.num_slices != 1:
        print("--num-slices only applies with --aot-tpu (a real run finds its slices from "
              "the devices; set mesh.dcn)", file=sys.stderr)
        return 2
    maybe_initialize_distributed(cfg.distributed, args)
    try:
        result = run(cfg)
    except TrainingDivergedError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return 3
    except (ConfigError, CheckpointError, InitError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if result.stopped == "preempted":
        saved = "checkpoint saved" if cfg.checkpoint.dir else "no checkpoint.dir: nothing saved"
        print(f"stopped by SIGTERM at step {result.final_step}; {saved}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
