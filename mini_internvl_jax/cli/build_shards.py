"""`mivl-build-shards META_JSON OUT_DIR`: InternVL JSONL datasets + images -> ArrayRecord shards
with the images embedded, a manifest (counts, bytes, sha256) and a meta JSON to train on."""

from __future__ import annotations

import argparse
import sys

from mini_internvl_jax.cli._shell import ExitCode, command, parse_args
from mini_internvl_jax.data.shards import (
    DEFAULT_SHARD_BYTES,
    MAX_SHARD_MB,
    META,
    MIN_SHARD_MB,
    build_shards,
    shard_bytes_from_mb,
)


@command
def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="mivl-build-shards", description=__doc__.split("\n")[0])
    p.add_argument("meta", help="InternVL meta JSON naming JSONL datasets")
    p.add_argument("out_dir", help="folder to create (built under a temporary name)")
    p.add_argument("--shard-mb", type=float, default=DEFAULT_SHARD_BYTES / 2**20,
                   help=f"target shard size in MiB, from {MIN_SHARD_MB:g} to {MAX_SHARD_MB:g} "
                        "(shards of a dataset come out equal in size)")
    p.add_argument("--skip-bad", action="store_true",
                   help="leave out records that cannot be embedded (listed in the manifest) "
                        "instead of stopping")
    p.add_argument("--overwrite", action="store_true", help="replace an existing OUT_DIR")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    args = parse_args(p, argv)
    m = build_shards(args.meta, args.out_dir, shard_bytes=shard_bytes_from_mb(args.shard_mb),
                     skip_bad=args.skip_bad, overwrite=args.overwrite,
                     progress=not args.no_progress)
    for name, d in m["datasets"].items():
        skipped = f", {len(d['skipped'])} skipped" if d["skipped"] else ""
        print(f"{name}: {d['records']} records in {len(d['shards'])} shard(s), "
              f"{d['bytes'] / 2**20:.1f} MiB{skipped}")
    print(f"wrote {args.out_dir}: train with data.meta_path={args.out_dir}/{META}")
    return ExitCode.OK


if __name__ == "__main__":
    sys.exit(main())
