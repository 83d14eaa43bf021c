"""`mivl-convert`: Hugging Face PyTorch checkpoints <-> converted Orbax folders."""

from __future__ import annotations

import argparse
import ctypes
import sys
from typing import Any

import jax
from tqdm import tqdm

from mini_internvl_jax.cli._shell import ExitCode, add_override_args, command, parse_args
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.convert.importer import convert_hf_to_orbax

EPILOG = """examples:
  mivl-convert --from-hf InternVL2-1B --to internvl2-1b-jax
  mivl-convert --from-hf InternVL2-2B --to out --dtype float32 --scan-layers
  mivl-convert --from-hf InternVL2-4B --to out image_token_id=32013 template=phi3-chat
  mivl-convert --from-orbax internvl2-1b-jax --to-hf InternVL2-1B-ft
  mivl-convert --from-orbax run/params --model-config mini-internvl-1b \\
      --to-hf out --layout native --max-shard-size 2GB
"""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mivl-convert", epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Convert InternVL2 / Mini-InternVL checkpoints between Hugging Face "
                    "(safetensors or pytorch_model.bin; original or transformers-native layout) "
                    "and this project's Orbax folders.")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--from-hf", metavar="HF_DIR", help="Hugging Face model folder to import")
    src.add_argument("--from-orbax", metavar="DIR",
                     help="converted folder (or a bare params checkpoint with --model-config)")
    p.add_argument("--to", metavar="OUT_DIR", help="converted folder to write (--from-hf)")
    p.add_argument("--to-hf", metavar="OUT_DIR", help="Hugging Face folder to write "
                   "(--from-orbax)")
    p.add_argument("--dtype", default="auto",
                   choices=["auto", "bfloat16", "float32", "float16"],
                   help="stored dtype; auto keeps the source checkpoint's (default)")
    p.add_argument("--layout", default="original", choices=["original", "native"],
                   help="--to-hf: InternVL remote-code names (original, default) or "
                        "transformers' InternVLForConditionalGeneration (native)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="--to-hf: largest safetensors file before sharding (default 5GB)")
    p.add_argument("--model-config", metavar="PRESET_YAML_OR_JSON",
                   help="--from-orbax on a bare params checkpoint: its model config")
    p.add_argument("--scan-layers", action="store_true",
                   help="--from-hf: store layers stacked (leading layer axis)")
    p.add_argument("--strict", dest="strict", action="store_true", default=True,
                   help="fail on tensors the model does not use (default)")
    p.add_argument("--no-strict", dest="strict", action="store_false",
                   help="report unexpected tensors and convert anyway")
    add_override_args(p, "image_token_id=92546 template=phi3-chat (--from-hf: the model "
                         "config)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace OUT_DIR if it exists (swapped in only after success)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


class _Progress:
    """A tqdm bar over tensors, created on the first tensor (when the total is known)."""

    def __init__(self, disable: bool):
        self.disable = disable
        self.bar: Any = None  # tqdm

    def __call__(self, name: str, index: int, total: int) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, unit="tensor", file=sys.stderr, disable=self.disable,
                            dynamic_ncols=True)
        self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _return_freed_memory_promptly() -> None:
    """Serve >= 1 MiB allocations by mmap so freeing them returns memory to the OS.

    Tensorstore's read buffers, freed after Orbax hands over each array, otherwise stay in
    glibc's heap arenas: +0.5x the checkpoint in peak RSS when exporting InternVL2-1B.
    """
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):  # not glibc: nothing to tune
        pass


def _keep_jax_on_the_host() -> None:
    """Conversion is pure host work: JAX stays off accelerators (and quiet) unless JAX_PLATFORMS
    asks otherwise. Set when the command runs, not at import, so importing this module changes
    nothing; jax reads the option when it first picks a backend."""
    if not jax.config.jax_platforms:  # type: ignore[attr-defined]
        jax.config.update("jax_platforms", "cpu")


@command
def main(argv: list[str]) -> int:
    _return_freed_memory_promptly()
    _keep_jax_on_the_host()
    parser = build_parser()
    args = parse_args(parser, argv)
    if args.from_hf and not args.to:
        parser.error("--from-hf needs --to OUT_DIR")
    if args.from_orbax and not args.to_hf:
        parser.error("--from-orbax needs --to-hf OUT_DIR")
    if args.from_hf and args.to_hf or args.from_orbax and args.to:
        parser.error("use --from-hf with --to, and --from-orbax with --to-hf")
    if args.from_orbax and args.overrides:
        parser.error("key=value overrides apply to --from-hf (the imported model's config)")
    progress = _Progress(disable=args.quiet)
    try:
        if args.from_hf:
            stats = convert_hf_to_orbax(args.from_hf, args.to, dtype=args.dtype,
                                        scan_layers=args.scan_layers, strict=args.strict,
                                        overrides=args.overrides, overwrite=args.overwrite,
                                        on_tensor=progress)
            progress.close()
            for name in stats.ignored:
                print(f"ignored unexpected tensor {name!r}", file=sys.stderr)
            print(stats.summary("converted") + f" -> {args.to}")
        else:
            stats = export_to_hf(args.from_orbax, args.to_hf, layout=args.layout,
                                 dtype=args.dtype, max_shard_size=args.max_shard_size,
                                 model_config=args.model_config, overwrite=args.overwrite,
                                 on_tensor=progress)
            progress.close()
            print(stats.summary("exported") + f" -> {args.to_hf}")
    finally:
        progress.close()
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
