"""The shell every command runs in: one error policy, one exit-code table, one override grammar
and the model-loading arguments that chat and evaluation share.

- Errors: `command(run)` turns a mistake the user can fix (`errors.UserError` and its
  subclasses, an existing output, a missing input, a full or read-only disk) into one
  `error: ...` line on stderr and exit code 2; anything else is a bug and keeps its traceback.
- Exit codes: `ExitCode` below is the whole table.
- Overrides: every command takes positional `key=value` tokens (`optim.lr=1e-5`,
  `mesh.tensor=2`, `template=phi3-chat`), read by `configlib.parse_override` (the value is
  YAML); `parse_args` accepts them before, between or after the flags.
"""

from __future__ import annotations

import argparse
import enum
import functools
import re
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import jax

from mini_internvl_jax import configlib
from mini_internvl_jax.checkpoints.resolve import open_source
from mini_internvl_jax.config import DTYPES
from mini_internvl_jax.configlib import ConfigError, check
from mini_internvl_jax.data.tokenizer import load_tokenizer
from mini_internvl_jax.errors import EXIT_USER_ERROR, UserError, user_error
from mini_internvl_jax.infer.generate import Generator
from mini_internvl_jax.infer.runtime import Runtime
from mini_internvl_jax.sharding import MESH_AXES, make_mesh


class ExitCode(enum.IntEnum):
    """What every command's exit status means."""

    OK = 0
    FINDINGS = 1  # mivl-validate-data: the dataset holds samples the run would reject
    USER_ERROR = EXIT_USER_ERROR  # bad input, existing output, unusable checkpoint, full disk
    DIVERGED = 3  # mivl-train: the loss or gradients stayed non-finite
    # 128 + N: mivl-train stopped by signal N (130 Ctrl-C, 143 SIGTERM), as a shell reports it
    SIGNAL_BASE = 128


class Main(Protocol):
    def __call__(self, argv: Sequence[str] | None = None) -> int: ...


def command(run: Callable[[list[str]], int]) -> Main:
    """`main(argv=None) -> int` running `run(argv)` under the one error policy."""

    @functools.wraps(run)
    def main(argv: Sequence[str] | None = None) -> int:
        try:
            return int(run(list(sys.argv[1:] if argv is None else argv)))
        except Exception as e:  # noqa: BLE001 - a bug is re-raised with its traceback
            line = user_error(e)
            if line is None:
                raise
            print(f"error: {line}", file=sys.stderr)
            return ExitCode.USER_ERROR

    return main


class UsageError(UserError):
    """A command-line value that cannot be used (the message names the flag)."""


_OVERRIDE = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]*(\.[A-Za-z_][A-Za-z0-9_-]*)*=")


def is_override(token: str) -> bool:
    """`key=value` with a dotted key (the one override grammar), not free text."""
    return bool(_OVERRIDE.match(token))


def parse_args(parser: argparse.ArgumentParser, argv: Sequence[str]) -> argparse.Namespace:
    """argparse, with positionals (the `key=value` overrides) allowed after any flag, e.g.
    `mivl-train --config demo --aot-tpu v5e:2x2 total_steps=2`."""
    return parser.parse_intermixed_args(list(argv))


def add_override_args(parser: argparse.ArgumentParser, example: str) -> None:
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"config overrides (the value is YAML), e.g. {example}")


@dataclass(frozen=True)
class MeshSizes:
    """`mesh.data=N mesh.fsdp=N mesh.tensor=N` of chat and evaluation: a mesh over the first
    data * fsdp * tensor devices (all 1: one device, no mesh)."""

    data: int = 1
    fsdp: int = 1
    tensor: int = 1

    def __post_init__(self):
        for axis in MESH_AXES:
            check(getattr(self, axis) >= 1, f"mesh.{axis}", "must be >= 1")


@dataclass(frozen=True)
class ModelOverrides:
    """The `key=value` overrides chat and evaluation accept."""

    mesh: MeshSizes = field(default_factory=MeshSizes)


def build_mesh(sizes: MeshSizes):
    """The mesh of `sizes` over the first devices, or None for one device."""
    n = sizes.data * sizes.fsdp * sizes.tensor
    if n == 1:
        return None
    devices = jax.devices()
    if n > len(devices):
        raise ConfigError(f"mesh (data={sizes.data}, fsdp={sizes.fsdp}, tensor={sizes.tensor}) "
                          f"needs {n} devices, {len(devices)} are available")
    return make_mesh(sizes.data, sizes.fsdp, sizes.tensor, devices=devices[:n])


def positive_int(text: str) -> int:
    """argparse type: 0 would otherwise read as "unset" and silently become the default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_model_args(p: argparse.ArgumentParser) -> None:
    """The model-loading flags of chat and evaluation; sharding is the `mesh.AXIS=N` override."""
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="converted folder (mivl-convert), Hugging Face InternVL folder or a "
                        "training run's checkpoint.dir")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer folder (default: the checkpoint folder)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="parameter and compute dtype (default: as stored)")
    p.add_argument("--max-num", type=int, default=None, metavar="N",
                   help="tile budget before the thumbnail (dynamic tiling): one image gets up "
                        "to N tiles, k images max(1, N // k) each, as InternVL")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: 1024 for chat, the task's own for evaluation")
    p.add_argument("--system", default=None, help="system message (default: InternVL's)")


MESH_HELP = ("mesh.AXIS=N (AXIS in data, fsdp, tensor) shards the parameters and batch rows "
             "over the first devices, e.g. mesh.tensor=2 for a model that does not fit one")


def model_overrides(overrides: Sequence[str]) -> ModelOverrides:
    return configlib.from_dict(ModelOverrides, configlib.apply_overrides({}, list(overrides)))


def load_runtime(args: argparse.Namespace, overrides: Sequence[str],
                 default_max_num: int) -> Runtime:
    """Any folder checkpoints/resolve.py knows (training run, converted, Hugging Face), run in the
    dtype it stores unless --dtype says otherwise, on the mesh of the `mesh.*` overrides."""
    mesh = build_mesh(model_overrides(overrides).mesh)
    max_num = default_max_num if args.max_num is None else args.max_num
    if max_num < 1:
        raise UsageError(f"--max-num must be >= 1, got {max_num}")
    source = open_source(args.checkpoint)
    compute = source.compute
    if args.dtype is not None:
        compute = compute.replace(dtype=args.dtype, param_dtype=args.dtype)
    model = source.load(compute, mesh=mesh)
    tok_dir = args.tokenizer or source.tokenizer_dir
    if tok_dir is None:
        raise FileNotFoundError(f"{args.checkpoint} holds no tokenizer (tokenizer.model, "
                                "tokenizer.json, or vocab.json + merges.txt); pass "
                                "--tokenizer DIR")
    tokenizer = load_tokenizer(tok_dir)
    return Runtime(Generator(model, mesh=mesh), tokenizer, source.template, max_num,
                   args.system)
