"""TensorBoard output, read back with an independent reader (tests/helpers/events.py): scalars,
the start-of-run sample tiles and decoded text, and how samples are cut out of a packed batch."""

import numpy as np
import pytest

from mini_internvl_jax.data.tiling import IMAGENET_MEAN, IMAGENET_STD
from mini_internvl_jax.train.metrics import MetricsLog, describe_samples, markdown_table
from tests.helpers.events import values

IMG = 9  # <IMG_CONTEXT> id in the hand-made batches below


def _normalise(images01: np.ndarray) -> np.ndarray:
    mean = np.array(IMAGENET_MEAN, np.float32)[:, None, None]
    std = np.array(IMAGENET_STD, np.float32)[:, None, None]
    return ((images01 - mean) / std).astype(np.float32)


def _decode(ids):
    return "".join(chr(ord("a") + i) for i in ids)  # ids 0..25 -> letters


def test_scalars_images_and_text_round_trip(tmp_path):
    log = MetricsLog(tmp_path, tensorboard=True)
    log.write(7, {"loss": 1.5, "lr": 0.25, "skipped": True, "note": "x"})
    log.write(300, {"loss": 0.75})
    rng = np.random.default_rng(0)
    image = rng.integers(0, 256, (1, 3, 8, 12)).astype(np.float32) / 255.0
    log.samples(1, ["**sample 0** first", "second | text"], image)
    log.close()
    got = values(tmp_path)
    assert got["loss"] == [(7, 1.5), (300, 0.75)]
    assert got["lr"] == [(7, 0.25)]
    assert "skipped" not in got and "note" not in got  # booleans and strings are not scalars
    [(step, png)] = got["samples/tiles"]
    assert step == 1 and png.shape == (8, 12, 3)
    np.testing.assert_array_equal(png, np.round(image[0].transpose(1, 2, 0) * 255))
    [(step, text)] = [v for k, v in got.items() if k.startswith("samples/text")][0]
    assert step == 1 and "**sample 0** first" in text and "second | text" in text
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 2


def test_describe_samples_cuts_packed_rows_and_matches_tiles():
    # two rows of 12 positions; 2 <IMG_CONTEXT> tokens per tile; segment 0 = padding
    ids = np.array([[1, IMG, IMG, IMG, IMG, 2, 3, 4, 5, 6, 0, 0],
                    [7, 8, 10, IMG, IMG, 11, 12, 0, 0, 0, 0, 0]], np.int32)
    seg = np.array([[1, 1, 1, 1, 1, 1, 1, 2, 2, 2, 0, 0],
                    [1, 1, 1, 1, 1, 1, 1, 0, 0, 0, 0, 0]], np.int32)
    labels = np.full_like(ids, -100)
    labels[0, 5:7] = [3, 4]      # sample 0 supervises "de"
    labels[0, 8:10] = [6, 20]    # sample 1 supervises "gu"
    labels[1, 5:7] = [12, 13]    # sample 2 supervises "mn"
    tiles01 = np.random.default_rng(1).random((4, 3, 4, 4)).astype(np.float32)
    batch = {"input_ids": ids, "labels": labels, "segment_ids": seg,
             "pixel_values": _normalise(tiles01), "image_flags": np.array([1, 1, 1, 0])}
    texts, images = describe_samples(batch, decode=_decode, image_token_id=IMG,
                                     num_image_tokens=2, max_samples=4)
    assert len(texts) == 3
    assert "tiles 0-1" in texts[0] and "    b<IMG_CONTEXT>x4cd\n" in texts[0]
    assert "    de" in texts[0] and "7 tokens, 2 supervised" in texts[0]
    assert "no tiles" in texts[1] and "    efg" in texts[1] and "    gu" in texts[1]
    assert "row 1" in texts[2] and "tiles 2-2" in texts[2] and "    hik<IMG_CONTEXT>x2lm" \
        in texts[2]
    np.testing.assert_allclose(images, tiles01[:3], atol=1e-6)  # tile 3 is padding
    texts, images = describe_samples(batch, decode=_decode, image_token_id=IMG,
                                     num_image_tokens=2, max_samples=1)
    assert len(texts) == 1 and images.shape == (2, 3, 4, 4)


@pytest.mark.parametrize("rows,expected", [
    ([["a", 1]], "| k | v |\n|---|---|\n| a | 1 |"),
    ([["x|y", "two\nlines"]], "| k | v |\n|---|---|\n| x\\|y | two lines |"),
])
def test_markdown_table(rows, expected):
    assert markdown_table(["k", "v"], rows) == expected
