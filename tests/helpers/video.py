"""Tiny test videos whose frames carry their own index, written with PyAV."""

import av
import numpy as np

WIDTH, HEIGHT, BITS = 96, 48, 6


def frame_pixels(index: int) -> np.ndarray:
    """RGB frame `index`: six 16-pixel vertical stripes spelling the index in binary (MSB
    left, white = 1) over a colour that changes with the index."""
    arr = np.empty((HEIGHT, WIDTH, 3), np.uint8)
    arr[...] = (40 + 7 * index) % 256, 90, (200 - 5 * index) % 256
    for b in range(BITS):
        if (index >> (BITS - 1 - b)) & 1:
            arr[:, b * 16:(b + 1) * 16] = 255
        else:
            arr[:, b * 16 + 4:(b + 1) * 16 - 4] = 0
    return arr


def frame_index(rgb: np.ndarray) -> int:
    """Reads the index back from a frame of any size (stripe centres, so resizes and lossy
    codecs keep it)."""
    h, w = rgb.shape[:2]
    value = 0
    for b in range(BITS):
        x = int((b + 0.5) * w / BITS)
        value = value * 2 + int(rgb[h // 4: 3 * h // 4, x].mean() > 160)
    return value


def write_video(path, num_frames: int, fps: int = 4, container: str = "mp4") -> None:
    """mp4 (MPEG-4 part 2, frame count in the header) or mkv (lossless FFV1, no count)."""
    fmt, codec, pix = {"mp4": ("mp4", "mpeg4", "yuv420p"),
                       "mkv": ("matroska", "ffv1", "yuv444p")}[container]
    with av.open(str(path), "w", format=fmt) as c:
        s = c.add_stream(codec, rate=fps)
        s.width, s.height, s.pix_fmt = WIDTH, HEIGHT, pix
        if codec == "mpeg4":
            s.options = {"qscale": "1"}
        for i in range(num_frames):
            for p in s.encode(av.VideoFrame.from_ndarray(frame_pixels(i), format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)


def decode_all(path) -> list[np.ndarray]:
    """Every frame as RGB, straight from PyAV (the tests' reference decode)."""
    with av.open(str(path)) as c:
        return [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
