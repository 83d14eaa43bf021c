"""`mivl-train --config PRESET_OR_YAML [key=value ...] [--aot-tpu TOPOLOGY [--num-slices N]]`.

Exit codes (cli/_shell.ExitCode): 0 finished (total_steps reached, or a finite dataset ran
out: final checkpoint saved); 2 a config, data or checkpoint problem (one line on stderr); 3
training diverged; 143 / 130 stopped by SIGTERM / Ctrl-C (checkpoint saved at the step boundary,
or, after a second signal or `checkpoint.stop_grace_s` without a step boundary, the process ends
without saving and the last checkpoint stays).

Multi-host runs start `jax.distributed.initialize()` themselves when real values show that
several processes take part (`multihost_reason`). A variable that is merely set, or set to
text, is not a cluster: with `jax[tpu]` installed on a machine without TPUs, libtpu leaves its
warning text in `TPU_WORKER_HOSTNAMES` (a sentence, commas included); a batch job on one Slurm
task still has `SLURM_JOB_ID`. Neither may start a multi-host initialisation that then fails
noisily.
"""

from __future__ import annotations

import argparse
import os
import re
import signal
import sys
from collections.abc import Mapping

import jax

from mini_internvl_jax.cli import _shell
from mini_internvl_jax.cli._shell import ExitCode, UsageError, add_override_args, command
from mini_internvl_jax.train.aot import compile_for_topology, format_report, resolve_remat
from mini_internvl_jax.train.config import load_train_config
from mini_internvl_jax.train.stopping import exit_code
from mini_internvl_jax.train.trainer import TrainingDivergedError, run

# A host name or IPv4 address (RFC 1123 labels), or a bracket-free IPv6 address.
_HOST = re.compile(r"^(?=.{1,253}$)[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
                   r"(\.[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*$|^[0-9A-Fa-f:]+:[0-9A-Fa-f:]*$")
_ADDRESS = re.compile(r"^[A-Za-z0-9.\-\[\]:]+$")  # host[:port], no spaces


def _count(value: str | None) -> int:
    try:
        return int(value.strip()) if value is not None else 0
    except ValueError:
        return 0


def tpu_hosts(value: str | None) -> list[str] | None:
    """The host list of `TPU_WORKER_HOSTNAMES`, or None when it is not a list of hosts."""
    if not value:
        return None
    hosts = [h.strip() for h in value.split(",")]
    if all(_HOST.match(h) for h in hosts):
        return hosts
    return None


def multihost_reason(environ: Mapping[str, str] | None = None) -> str | None:
    """Which variable shows that several processes take part, or None for a single process."""
    env = os.environ if environ is None else environ
    hosts = tpu_hosts(env.get("TPU_WORKER_HOSTNAMES"))
    if hosts is not None and len(hosts) > 1:
        return f"TPU_WORKER_HOSTNAMES lists {len(hosts)} hosts"
    if _ADDRESS.match(env.get("MEGASCALE_COORDINATOR_ADDRESS", "").strip()):
        return "MEGASCALE_COORDINATOR_ADDRESS is set"
    for key in ("SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE"):
        if _count(env.get(key)) > 1:
            return f"{key}={env[key].strip()}"
    return None


def maybe_initialize_distributed(mode: str, args: argparse.Namespace) -> None:
    """jax.distributed.initialize() for multi-host runs; must run before any JAX computation."""
    if args.coordinator:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    elif mode == "on" or (mode == "auto" and multihost_reason() is not None):
        jax.distributed.initialize()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mivl-train", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 1)[1],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True,
                   help="training preset name (demo, stage1, stage2, lora, ...) or a YAML path")
    add_override_args(p, "optim.lr=1e-5 mesh.tensor=2")
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
    return p


def parse_args(argv: list[str]) -> argparse.Namespace:
    return _shell.parse_args(build_parser(), argv)


@command
def main(argv: list[str]) -> int:
    args = parse_args(argv)
    cfg = load_train_config(args.config, args.overrides)
    if args.aot_tpu:
        try:
            report = compile_for_topology(cfg, args.aot_tpu, args.num_slices)
        except RuntimeError as e:  # no libtpu, an unknown topology, XLA refusing the program
            raise UsageError(f"AOT compile failed: {e}") from e
        print(format_report(report))
        return ExitCode.OK
    if args.num_slices != 1:
        raise UsageError("--num-slices only applies with --aot-tpu (a real run finds its "
                         "slices from the devices; set mesh.dcn)")
    maybe_initialize_distributed(cfg.distributed, args)
    try:
        cfg = resolve_remat(cfg)  # remat auto: compile, keep the first policy that fits
        result = run(cfg, allow_config_change=args.allow_config_change)
    except KeyboardInterrupt:  # Ctrl-C before the step loop: nothing to save yet
        print("interrupted before training started; nothing saved", file=sys.stderr)
        return exit_code(signal.SIGINT)
    except TrainingDivergedError as e:
        print(f"training stopped: {e}", file=sys.stderr)
        return ExitCode.DIVERGED
    if result.stopped == "preempted":
        saved = "checkpoint saved" if cfg.checkpoint.dir else "no checkpoint.dir: nothing saved"
        signum = result.stop_signal or signal.SIGTERM
        print(f"stopped by {signal.Signals(signum).name} at step {result.final_step}; {saved}",
              flush=True)
        return exit_code(signum)
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
