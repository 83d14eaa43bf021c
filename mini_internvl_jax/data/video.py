"""Video as a sequence of frames, the way InternVL2 feeds it: one 448 tile per frame (no dynamic
tiling, no thumbnail) and one `<image>` placeholder per frame.

Which frames, by InternVL's rules:
  * inference (model card `load_video` / `get_index`): `num_segments` equal segments between
    frame 0 and the last frame (or the seconds in `bound`), one frame at each segment's middle:
    `int(start + seg / 2 + round(seg * k))` with `seg = (end - start) / num_segments`;
  * training (`read_frames_decord` / `get_frame_indices`): a frame count drawn uniformly from
    [min_num_frames, max_num_frames], the video cut into that many intervals
    (`linspace(0, vlen, n + 1)` as int) and one random frame drawn from each, or the interval
    middle with `"middle"` sampling; a video with fewer frames than asked repeats its last pick.
    Draws come from a numpy Generator the caller seeds, so a sample is reproducible.

Decoding uses PyAV (`av`, FFmpeg bindings), imported only when a video is read; remote paths
(`gs://`, ...) are read into memory through `etils.epath` first. Frames are
decoded in order and the chosen ones kept, so any container and codec FFmpeg reads works; the
frame count comes from the stream header, or from a counting pass when the container does not
store it (Matroska/WebM).
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from etils import epath
from PIL import Image

from mini_internvl_jax.data import tiling
from mini_internvl_jax.data.config import MAX_NUM_FRAMES
from mini_internvl_jax.errors import MissingDependencyError

DEFAULT_NUM_FRAMES = 8  # the InternVL2 model cards' video example (`num_segments=8`)
# InternVL2's training defaults (`LazySupervisedDataset`: min_num_frame, max_num_frame).
TRAIN_MIN_FRAMES = 8
TRAIN_MAX_FRAMES = 32


class VideoError(ValueError):
    """A video that cannot be read; `reason` is "missing_video" or "corrupt_video"."""

    def __init__(self, reason: str, detail: str):
        super().__init__(detail)
        self.reason = reason


@dataclass(frozen=True)
class VideoRef:
    """A video to show the model: path or encoded bytes, how many frames, optional time window
    (start, end) in seconds. Stands in a list of images wherever prompts are built."""

    source: str | bytes | os.PathLike
    num_frames: int = DEFAULT_NUM_FRAMES
    bound: tuple[float, float] | None = None

    def __post_init__(self):
        if isinstance(self.num_frames, bool) or not isinstance(self.num_frames, int) or \
                not 1 <= self.num_frames <= MAX_NUM_FRAMES:
            raise ValueError(f"video {self.name}: num_frames must be an integer from 1 to "
                             f"{MAX_NUM_FRAMES}, got "
                             f"{self.num_frames!r}")

    @property
    def name(self) -> str:
        return "embedded video" if isinstance(self.source, bytes) else str(self.source)


@dataclass
class Frames:
    """Decoded frames (RGB) and where they came from."""

    images: list[Image.Image]
    indices: list[int]
    num_video_frames: int
    fps: float


def segment_indices(num_video_frames: int, num_segments: int, fps: float = 0.0,
                    bound: tuple[float, float] | None = None, first_idx: int = 0) -> np.ndarray:
    """InternVL's `get_index`: the middle frame of each of `num_segments` equal segments."""
    max_frame = num_video_frames - 1
    if bound is None:  # InternVL's (-100000, 100000) s window: the whole video
        start_idx, end_idx = first_idx, max_frame
    else:
        start_idx = max(first_idx, round(bound[0] * fps))
        end_idx = min(round(bound[1] * fps), max_frame)
    seg_size = float(end_idx - start_idx) / num_segments
    return np.array([int(start_idx + seg_size / 2 + np.round(seg_size * k))
                     for k in range(num_segments)], dtype=np.int64)


def sample_num_frames(rng: np.random.Generator, min_frames: int, max_frames: int) -> int:
    """Frames for one training sample, uniform in [min_frames, max_frames] as in InternVL."""
    return int(rng.integers(min_frames, max_frames + 1))


def train_frame_indices(vlen: int, num_frames: int, rng: np.random.Generator,
                        sample: str = "rand") -> list[int]:
    """InternVL's `get_frame_indices` for "rand" and "middle", padded to `num_frames`.

    As in InternVL, interval k is [a_k, a_{k+1} - 1] and the random pick is
    `choice(range(a_k, a_{k+1} - 1))`, so an interval's last frame is never drawn; when some
    interval is too short to draw from, sorted distinct random frames are used instead.
    """
    acc = min(num_frames, vlen)
    edges = np.linspace(0, vlen, acc + 1).astype(int)
    ranges = [(int(edges[k]), int(edges[k + 1]) - 1) for k in range(acc)]
    if sample == "rand":
        if all(b > a for a, b in ranges):
            idx = [int(rng.integers(a, b)) for a, b in ranges]
        else:
            idx = sorted(int(i) for i in rng.permutation(vlen)[:acc])
    elif sample == "middle":
        idx = [(a + b) // 2 for a, b in ranges]
    else:
        raise ValueError(f"frame sampling {sample!r} is not 'rand' or 'middle'")
    return idx + [idx[-1]] * (num_frames - len(idx))


def _av():
    try:
        import av
    except ImportError:
        raise MissingDependencyError("reading videos needs PyAV: pip install av") from None
    return av


def _open(source, av):
    if isinstance(source, bytes):
        return av.open(io.BytesIO(source))
    if not os.path.isfile(source):
        raise VideoError("missing_video", f"{source}: no such file")
    return av.open(os.fspath(source))


def read_frames(source, choose: Callable[[int, float], Sequence[int]]) -> Frames:
    """Frames `choose(num_video_frames, fps)` picks (indices may repeat), in that order.

    Indices past the frames that actually decode (a header that overstates the count) take the
    last decoded frame.
    """
    av = _av()
    name = "embedded video" if isinstance(source, bytes) else str(source)
    if isinstance(source, str) and "://" in source:  # gs:// etc.: read once through epath
        try:
            source = epath.Path(source).read_bytes()
        except (FileNotFoundError, IsADirectoryError, PermissionError) as e:
            raise VideoError("missing_video", f"{name}: {type(e).__name__}") from None
    try:
        with _open(source, av) as c:
            if not c.streams.video:
                raise VideoError("corrupt_video", f"{name}: no video stream")
            stream = c.streams.video[0]
            vlen = int(stream.frames or 0)
            rate = stream.average_rate or stream.guessed_rate
            fps = float(rate) if rate else 0.0
        if vlen <= 0:  # the container does not store a frame count: count by decoding
            with _open(source, av) as c:
                vlen = sum(1 for _ in c.decode(video=0))
        if vlen <= 0:
            raise VideoError("corrupt_video", f"{name}: no frames")
        indices = [int(i) for i in choose(vlen, fps)]
        if not indices or min(indices) < 0:
            raise ValueError(f"{name}: bad frame selection {indices}")
        wanted = set(indices)
        last = max(indices)
        got: dict[int, Image.Image] = {}
        prev = None
        with _open(source, av) as c:
            for k, frame in enumerate(c.decode(video=0)):
                if k in wanted:
                    got[k] = frame.to_image()
                prev = (k, frame)
                if k >= last:
                    break
        if prev is None:
            raise VideoError("corrupt_video", f"{name}: no frame decodes")
        if prev[0] not in got:
            got[prev[0]] = prev[1].to_image()
        images = [got.get(i, got[prev[0]]) for i in indices]
    except VideoError:
        raise
    except (av.FFmpegError, OSError, EOFError) as e:
        raise VideoError("corrupt_video", f"{name}: {type(e).__name__}: {e}") from None
    return Frames([im if im.mode == "RGB" else im.convert("RGB") for im in images], indices,
                  vlen, fps)


def load_video(ref: VideoRef) -> Frames:
    """The inference frames of InternVL's `load_video` (segment middles over the window)."""
    return read_frames(ref.source, lambda n, fps: segment_indices(
        n, ref.num_frames, fps, ref.bound).tolist())


def frame_prefix(num_frames: int) -> str:
    """`Frame1: <image>\\nFrame2: <image>\\n...` (InternVL2's training and model-card prompt;
    InternVL 2.5 later switched training to `Frame-1:`)."""
    return "".join(f"Frame{k + 1}: <image>\n" for k in range(num_frames))


def resize_frames(frames: Sequence[Image.Image], image_size: int) -> np.ndarray:
    """uint8 [n, size, size, 3]: each frame squashed to one tile (InternVL's transform)."""
    out = np.empty((len(frames), image_size, image_size, 3), dtype=np.uint8)
    for k, im in enumerate(frames):
        out[k] = tiling.resize_single(im, image_size)[0]
    return out
