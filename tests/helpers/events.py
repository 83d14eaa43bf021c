"""Reads TensorBoard event files without the package: TFRecord framing checked with
tensorboardX's CRC32C, records parsed with tensorboardX's compiled `Event` protobuf.

(The `tensorboard` package's EventAccumulator would be the natural reader; it is not installed
here, and this reader shares no code with mini_internvl_jax.)
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image
from tensorboardX.crc32c import crc32c
from tensorboardX.proto.event_pb2 import Event


def _masked(data: bytes) -> int:
    c = crc32c(data)
    return (((c >> 15) | (c << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def read_events(path: Path) -> list[Event]:
    data = Path(path).read_bytes()
    events, pos = [], 0
    while pos < len(data):
        header = data[pos:pos + 8]
        (n,) = struct.unpack("<Q", header)
        (hcrc,) = struct.unpack("<I", data[pos + 8:pos + 12])
        body = data[pos + 12:pos + 12 + n]
        (bcrc,) = struct.unpack("<I", data[pos + 12 + n:pos + 16 + n])
        assert hcrc == _masked(header) and bcrc == _masked(body), f"bad CRC at byte {pos}"
        events.append(Event.FromString(body))
        pos += 16 + n
    return events


def values(log_dir: Path) -> dict[str, list[tuple[int, object]]]:
    """tag -> [(step, value)] over every event file in `log_dir`: floats for scalars, uint8
    [H, W, C] arrays for images, str for text."""
    out: dict[str, list[tuple[int, object]]] = {}
    for path in sorted(Path(log_dir).glob("events.out.tfevents.*")):
        for ev in read_events(path):
            for v in ev.summary.value:
                kind = v.WhichOneof("value")
                if kind == "simple_value":
                    val: object = v.simple_value
                elif kind == "image":
                    val = np.asarray(Image.open(io.BytesIO(v.image.encoded_image_string)))
                elif kind == "tensor":
                    val = v.tensor.string_val[0].decode()
                else:
                    raise AssertionError(f"unexpected summary kind {kind} for {v.tag}")
                out.setdefault(v.tag, []).append((ev.step, val))
    return out
