"""InternVL dynamic tiling, pixel-exact with `dynamic_preprocess` + `build_transform`.

Rule (InternVL `internvl/train/dataset.py`): candidate grids are all (cols, rows) with
min_num <= cols*rows <= max_num, ordered by area; the grid whose cols/rows is nearest the
image's width/height wins, and on an exact tie a later (larger) grid takes over only when the
image has more than half its pixel area (W*H > 0.5 * size^2 * cols * rows). The image is
resized once to (size*cols, size*rows) with PIL bicubic, cut into row-major tiles, and a
whole-image size x size thumbnail is appended when there is more than one tile.

The per-tile `Resize((size, size))` of the reference is a no-op on exact-size tiles (PIL
returns a copy), so tiles are numpy views of one resized array. Normalisation reproduces
torchvision's float32 `ToTensor` + `Normalize` arithmetic bit for bit.

Speed-ups that change pixels were measured and rejected: `Image.draft` (JPEG DCT scaling)
and `resize(..., reducing_gap=...)` both differ from a full decode + full bicubic resize.
"""

from __future__ import annotations

import functools
import io

import numpy as np
from PIL import Image

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_MEAN = np.asarray(IMAGENET_MEAN, dtype=np.float32).reshape(3, 1, 1)
_STD = np.asarray(IMAGENET_STD, dtype=np.float32).reshape(3, 1, 1)


@functools.lru_cache(maxsize=64)
def candidate_grids(min_num: int, max_num: int) -> tuple[tuple[int, int], ...]:
    """(cols, rows) candidates in the reference's scan order.

    Built with the same set expression as InternVL so grids of equal area come out in the
    same (hash-determined) order, which decides exact ties between them.
    """
    target_ratios = set(
        (i, j) for n in range(min_num, max_num + 1) for i in range(1, n + 1)
        for j in range(1, n + 1) if i * j <= max_num and i * j >= min_num)
    return tuple(sorted(target_ratios, key=lambda x: x[0] * x[1]))


def choose_grid(width: int, height: int, *, min_num: int = 1, max_num: int = 6,
                image_size: int = 448) -> tuple[int, int]:
    """(cols, rows) InternVL picks for a width x height image."""
    aspect_ratio = width / height
    area = width * height
    best_diff = float("inf")
    best = (1, 1)
    for cols, rows in candidate_grids(min_num, max_num):
        diff = abs(aspect_ratio - cols / rows)
        if diff < best_diff:
            best_diff = diff
            best = (cols, rows)
        elif diff == best_diff and area > 0.5 * image_size * image_size * cols * rows:
            best = (cols, rows)
    return best


def num_tiles(width: int, height: int, *, min_num: int, max_num: int, image_size: int,
              use_thumbnail: bool) -> int:
    cols, rows = choose_grid(width, height, min_num=min_num, max_num=max_num,
                             image_size=image_size)
    n = cols * rows
    return n + 1 if use_thumbnail and n > 1 else n


def tile_image(image: Image.Image, *, image_size: int = 448, min_num: int = 1,
               max_num: int = 6, use_thumbnail: bool = True) -> np.ndarray:
    """uint8 tiles [n, size, size, 3] of an RGB image: grid tiles row-major, thumbnail last."""
    size = image_size
    cols, rows = choose_grid(*image.size, min_num=min_num, max_num=max_num, image_size=size)
    n = cols * rows
    thumb = use_thumbnail and n > 1
    out = np.empty((n + thumb, size, size, 3), dtype=np.uint8)
    # Each resize is one PIL call: Pillow picks the order of its two passes per call, so
    # splitting a resize into separate passes (to share one) would change pixels.
    grid = np.asarray(image.resize((size * cols, size * rows), Image.Resampling.BICUBIC))
    out[:n].reshape(rows, cols, size, size, 3)[...] = grid.reshape(
        rows, size, cols, size, 3).transpose(0, 2, 1, 3, 4)
    if thumb:
        out[n] = np.asarray(image.resize((size, size), Image.Resampling.BICUBIC))
    return out


def resize_single(image: Image.Image, image_size: int) -> np.ndarray:
    """One tile of the whole image (dynamic tiling off, InternVL's plain transform)."""
    return np.asarray(image.resize((image_size, image_size), Image.Resampling.BICUBIC))[None]


def jpeg_degrade(tiles: np.ndarray, qualities) -> np.ndarray:
    """InternVL's train-time augmentation: re-encode each tile as JPEG at its quality."""
    out = np.empty_like(tiles)
    for k, q in enumerate(qualities):
        buf = io.BytesIO()
        Image.fromarray(tiles[k]).save(buf, format="JPEG", quality=int(q))
        buf.seek(0)
        with Image.open(buf) as im:
            out[k] = np.asarray(im.convert("RGB"))
    return out


def normalize_tiles(tiles: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """uint8 [n, H, W, 3] -> float32 [n, 3, H, W], ((x / 255) - mean) / std in float32.

    Same operations and rounding as torchvision `ToTensor()` + `Normalize(IMAGENET)`.
    """
    if out is None:
        out = np.empty((tiles.shape[0], 3, tiles.shape[1], tiles.shape[2]), dtype=np.float32)
    out[...] = tiles.transpose(0, 3, 1, 2)
    out /= np.float32(255)
    out -= _MEAN
    out /= _STD
    return out

