"""Reads an offline Weights & Biases run without the package under test: the `.wandb` file is a
LevelDB-style log (32 KiB blocks; records framed by CRC, length and type) of
`wandb_internal_pb2.Record` protobufs (unlike LevelDB, the CRC is plain zlib CRC-32 of type and
body). wandb 0.31 ships no Python reader for it any more."""

from __future__ import annotations

import json
import struct
import time
import zlib
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

_BLOCK = 32768
_FULL, _FIRST, _MIDDLE, _LAST = 1, 2, 3, 4


def read_records(path: Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, version = struct.unpack_from("<4sHB", data, 0)
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), "not a wandb run file"
    pos, records, pending = 7, [], b""
    while pos + 7 <= len(data):
        left = _BLOCK - pos % _BLOCK
        if left < 7:  # block trailer
            pos += left
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        body = data[pos + 7:pos + 7 + length]
        assert crc == zlib.crc32(bytes([kind]) + body), f"bad CRC at byte {pos}"
        pos += 7 + length
        pending += body
        if kind in (_FULL, _LAST):
            records.append(pb.Record.FromString(pending))
            pending = b""
    return records


def _finished_records(wandb_dir: Path, timeout_s: float) -> list[pb.Record]:
    """The records of the one offline run, once its `exit` record is on disk (wandb's service
    process writes the file asynchronously, so it can trail `run.finish()`)."""
    deadline = time.monotonic() + timeout_s
    while True:
        [run_file] = sorted(Path(wandb_dir).glob("offline-run-*/run-*.wandb"))
        try:
            records = read_records(run_file)
        except (AssertionError, struct.error):  # a record still being written
            records = []
        if any(r.WhichOneof("record_type") == "exit" for r in records):
            return records
        if time.monotonic() > deadline:
            raise AssertionError(f"{run_file} has no exit record after {timeout_s} s")
        time.sleep(0.2)


def read_run(wandb_dir: Path, timeout_s: float = 30.0) -> tuple[dict, list[dict]]:
    """(config, history rows) of the one offline run under `wandb_dir` (the `wandb/` folder)."""
    config: dict = {}
    history: list[dict] = []
    for r in _finished_records(wandb_dir, timeout_s):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            config.update({u.key: json.loads(u.value_json) for u in r.run.config.update})
        elif kind == "config":
            config.update({u.key: json.loads(u.value_json) for u in r.config.update})
        elif kind == "history":
            history.append({".".join(i.nested_key) or i.key: json.loads(i.value_json)
                            for i in r.history.item})
    return config, history
