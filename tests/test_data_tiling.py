"""Dynamic tiling vs an independent brute-force statement of InternVL's rule.

The reference: candidates (i cols, j rows) with min <= i*j <= max; the nearest ratio i/j to
W/H wins; among equally near candidates the smallest-area one is taken first and a larger
one replaces it only when W*H > 0.5 * size^2 * i * j. Pixels: one bicubic PIL resize to
(size*i, size*j), row-major crops, then a whole-image thumbnail if more than one tile.
"""

import numpy as np
import pytest
import torch
from PIL import Image

from mini_internvl_jax.data import tiling


def brute_grid(w, h, min_num, max_num, size):
    cands = [(i, j) for i in range(1, max_num + 1) for j in range(1, max_num + 1)
             if min_num <= i * j <= max_num]
    if not cands:
        return (1, 1)
    diff = {c: abs(w / h - c[0] / c[1]) for c in cands}
    best = min(diff.values())
    tied = sorted((c for c in cands if diff[c] == best), key=lambda c: c[0] * c[1])
    winner = tied[0]
    for c in tied[1:]:
        if w * h > 0.5 * size * size * c[0] * c[1]:
            winner = c
    return winner


def brute_tiles(img, grid, size, use_thumbnail):
    cols, rows = grid
    resized = img.resize((size * cols, size * rows))  # PIL default: bicubic for RGB
    out = []
    for k in range(cols * rows):
        box = ((k % cols) * size, (k // cols) * size, (k % cols + 1) * size,
               (k // cols + 1) * size)
        out.append(np.asarray(resized.crop(box)))
    if use_thumbnail and len(out) > 1:
        out.append(np.asarray(img.resize((size, size))))
    return np.stack(out)


# (width, height): extreme ratios, exact ties between grids, tiny and large images.
SIZES = [
    (1, 1), (2, 1), (1, 2), (1, 1000), (1000, 1), (3, 7), (17, 5), (448, 448), (447, 448),
    (896, 448), (448, 896), (1344, 448), (5, 4), (500, 400), (600, 480), (1000, 800),
    (1200, 960), (800, 600), (640, 480), (1920, 1080), (1080, 1920), (2000, 300),
    (300, 2000), (1280, 400), (700, 1000), (449, 300), (900, 900), (1300, 1300),
    (224, 224), (100, 50), (1001, 500), (1500, 1000), (2048, 64), (64, 2048), (333, 999),
    (1344, 896), (896, 1344), (1600, 1200), (896, 1008), (1008, 896), (1024, 882),
]


@pytest.mark.parametrize("max_num", [6, 12])
def test_grid_matches_brute_force_rule(max_num):
    for w, h in SIZES:
        for size in (448, 56):
            got = tiling.choose_grid(w, h, min_num=1, max_num=max_num, image_size=size)
            assert got == brute_grid(w, h, 1, max_num, size), (w, h, size, max_num)


def test_grid_ties_pick_larger_grid_only_for_big_images():
    # 5:4 is equally near 1:1, 2:2 and 3:2 (|1.25 - r| = 0.25).
    assert tiling.choose_grid(5, 4, max_num=6) == (1, 1)
    assert tiling.choose_grid(500, 400, max_num=6) == (1, 1)  # 200000 <= 0.5*448^2*4
    assert tiling.choose_grid(800, 640, max_num=6) == (2, 2)  # 512000 > 401408
    assert tiling.choose_grid(1000, 800, max_num=6) == (3, 2)  # 800000 > 602112
    # Exact ratio 1: (1,1), (2,2) and (3,3) with max 12; the area decides.
    assert tiling.choose_grid(448, 448, max_num=12) == (1, 1)
    assert tiling.choose_grid(900, 900, max_num=12) == (2, 2)  # 810000 <= 903168
    assert tiling.choose_grid(1000, 1000, max_num=12) == (3, 3)
    # W*H exactly 0.5*448^2*9: "more than half" is strict, so (3, 3) does not take over.
    assert tiling.choose_grid(896, 1008, max_num=12) == (2, 2)


def test_grid_with_min_num_and_dense_sweep():
    rng = np.random.default_rng(0)
    for _ in range(400):
        w, h = (int(v) for v in rng.integers(1, 3000, size=2))
        lo = int(rng.integers(1, 4))
        hi = int(rng.integers(lo, 13))
        assert tiling.choose_grid(w, h, min_num=lo, max_num=hi, image_size=448) == brute_grid(
            w, h, lo, hi, 448), (w, h, lo, hi)


def _noise_image(rng, w, h):
    return Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("size,max_num", [(448, 6), (56, 12)])
def test_tile_pixels_match_reference(size, max_num):
    rng = np.random.default_rng(1)
    for w, h in SIZES:
        if w * h > 1300 * 1300:
            w, h = w // 2, h // 2
        img = _noise_image(rng, w, h)
        grid = brute_grid(w, h, 1, max_num, size)
        want = brute_tiles(img, grid, size, use_thumbnail=True)
        got = tiling.tile_image(img, image_size=size, max_num=max_num, use_thumbnail=True)
        assert got.dtype == np.uint8 and got.shape == want.shape, (w, h)
        np.testing.assert_array_equal(got, want, err_msg=f"{w}x{h}")
        n = tiling.num_tiles(w, h, min_num=1, max_num=max_num, image_size=size,
                             use_thumbnail=True)
        assert n == len(want)


def test_no_thumbnail_and_single_tile():
    rng = np.random.default_rng(2)
    img = _noise_image(rng, 900, 450)
    got = tiling.tile_image(img, image_size=56, max_num=6, use_thumbnail=False)
    np.testing.assert_array_equal(got, brute_tiles(img, (2, 1), 56, use_thumbnail=False))
    small = _noise_image(rng, 40, 40)
    one = tiling.tile_image(small, image_size=56, max_num=6, use_thumbnail=True)
    assert one.shape == (1, 56, 56, 3)  # a single tile gets no thumbnail
    np.testing.assert_array_equal(tiling.resize_single(img, 56)[0],
                                  np.asarray(img.resize((56, 56))))


def test_normalize_bit_exact_with_torchvision_arithmetic():
    rng = np.random.default_rng(3)
    tiles = rng.integers(0, 256, (3, 56, 56, 3), dtype=np.uint8)
    got = tiling.normalize_tiles(tiles)
    # torchvision: to_tensor = permute + float().div(255); Normalize = sub_(mean).div_(std)
    x = torch.from_numpy(tiles).permute(0, 3, 1, 2).contiguous().float().div(255)
    mean = torch.tensor(tiling.IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(tiling.IMAGENET_STD).view(1, 3, 1, 1)
    want = x.sub_(mean).div_(std).numpy()
    assert got.dtype == np.float32 and got.shape == (3, 3, 56, 56)
    np.testing.assert_array_equal(got, want)


def test_jpeg_degrade_is_per_tile_jpeg_roundtrip():
    rng = np.random.default_rng(4)
    tiles = rng.integers(0, 256, (2, 56, 56, 3), dtype=np.uint8)
    out = tiling.jpeg_degrade(tiles, [75, 100])
    import io

    for k, q in enumerate([75, 100]):
        buf = io.BytesIO()
        Image.fromarray(tiles[k]).save(buf, format="JPEG", quality=q)
        np.testing.assert_array_equal(out[k], np.asarray(Image.open(buf).convert("RGB")))
    assert not np.array_equal(out[0], tiles[0])
