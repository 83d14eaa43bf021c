"""Run metrics: MFU against a per-chip peak table, a JSONL log and TensorBoard scalars.

TensorBoard events are written by a small built-in writer (TFRecord framing + the two protobuf
messages scalars need), so logging needs neither TensorFlow nor tensorboardX.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import time
from pathlib import Path

# Dense bf16 TFLOP/s per chip, matched against jax's device_kind (lower case, first hit wins).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6", 918.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v5p", 459.0),
    ("tpu v5", 459.0), ("tpu v4", 275.0),
    ("gb200", 2250.0), ("b200", 2250.0), ("h200", 989.4), ("h100 pcie", 756.0),
    ("h100", 989.4), ("a100", 312.0), ("l40s", 362.0), ("l4", 121.0),
)


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for key, value in PEAK_TFLOPS:
        if key in kind:
            return value
    return None


def mfu(flops_per_step: float, step_seconds: float, num_chips: int,
        peak_per_chip_tflops: float | None) -> float | None:
    if not peak_per_chip_tflops or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (num_chips * peak_per_chip_tflops * 1e12)


# ----------------------------------------------------------------------------------------------
# TensorBoard event files

def _crc32c_table() -> list[int]:
    table = []
    for i in range(256):
        c = i
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return table


_TABLE = _crc32c_table()


def crc32c(data: bytes) -> int:
    c = 0xFFFFFFFF
    for byte in data:
        c = _TABLE[(c ^ byte) & 0xFF] ^ (c >> 8)
    return c ^ 0xFFFFFFFF


def _masked_crc(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _field_bytes(number: int, payload: bytes) -> bytes:
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int | None = None, *, file_version: str | None = None,
           scalars: dict[str, float] | None = None) -> bytes:
    """Serialised tensorflow.Event: wall_time=1 (double), step=2, file_version=3, summary=5."""
    msg = _varint(1 << 3 | 1) + struct.pack("<d", wall_time)
    if step is not None:
        msg += _varint(2 << 3) + _varint(step)
    if file_version is not None:
        msg += _field_bytes(3, file_version.encode())
    if scalars:
        values = b"".join(  # Summary.Value: tag=1, simple_value=2 (float)
            _field_bytes(1, _field_bytes(1, tag.encode()) + _varint(2 << 3 | 5)
                         + struct.pack("<f", float(v)))
            for tag, v in scalars.items())
        msg += _field_bytes(5, values)
    return msg


def tfrecord(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return (header + struct.pack("<I", _masked_crc(header)) + data
            + struct.pack("<I", _masked_crc(data)))


class TensorBoardWriter:
    def __init__(self, log_dir: str | Path):
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = Path(log_dir) / name
        self._fh = open(self.path, "ab")  # noqa: SIM115 - kept open for the whole run
        self._fh.write(tfrecord(_event(time.time(), file_version="brain.Event:2")))
        self._fh.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        self._fh.write(tfrecord(_event(time.time(), step, scalars=values)))
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def drop_rows_after(path: Path, step: int) -> int:
    """Removes rows logged after `step` (by a run that was killed and is resumed from `step`,
    so those steps run again); returns how many. Rewritten atomically."""
    from mini_internvl_jax.fileio import write_atomic

    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):  # a line cut short by a kill
            continue
        if isinstance(row_step, int) and row_step > step:
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        write_atomic(path, "".join(keep))
    return len(lines) - len(keep)


class MetricsLog:
    """metrics.jsonl (one object per logged step) and, optionally, TensorBoard scalars.

    `start_step`: the step the run resumes from; rows after it are dropped, so re-done steps
    are never recorded twice."""

    def __init__(self, log_dir: str | Path | None, *, tensorboard: bool, start_step: int = 0):
        self.jsonl = None
        self.tb = None
        if log_dir is None:
            return
        Path(log_dir).mkdir(parents=True, exist_ok=True)
        drop_rows_after(Path(log_dir) / "metrics.jsonl", start_step)
        self.jsonl = open(Path(log_dir) / "metrics.jsonl", "a")  # noqa: SIM115
        if tensorboard:
            self.tb = TensorBoardWriter(log_dir)

    def write(self, step: int, values: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            self.tb.scalars(step, {k: v for k, v in values.items()
                                   if isinstance(v, (int, float)) and not isinstance(v, bool)})

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
