"""Packing: first-fit placement, batch layout, conservation, resume, bad-sample limit."""

import functools
import json

import grain
import numpy as np
import pytest

from mini_internvl_jax.batch import BATCH_DTYPES, BatchSpec
from mini_internvl_jax.data.errors import DataError, Skipped
from mini_internvl_jax.data.packing import (
    BatchBuilder,
    BatchGeometry,
    PackIterDataset,
    finalize_batch,
)
from mini_internvl_jax.data.processing import Sample, loss_weights, shifted_labels

CTX, IMG, IMG_END, PAD = 5, 3, 4, 0
NIT = 2  # image tokens per tile
SIZE = 4
MEAN = np.array([0.485, 0.456, 0.406])
STD = np.array([0.229, 0.224, 0.225])


def make_sample(uid: int, length: int, tiles: int, reduction: str = "token") -> Sample:
    """Sample whose first token is 100 + uid and whose tile k is filled with uid*10 + k."""
    img = [IMG] + [CTX] * (NIT * tiles) + [IMG_END] if tiles else []
    body = [100 + uid] + img
    assert length >= len(body) + 1
    ids = np.array(body + [200 + (uid + k) % 50 for k in range(length - len(body))], np.int32)
    trained = np.zeros(length, bool)
    trained[len(body) + 1:] = True
    labels = shifted_labels(ids, trained)
    t = np.stack([np.full((SIZE, SIZE, 3), (uid * 10 + k) % 256, np.uint8)
                  for k in range(tiles)]) if tiles else np.zeros((0, SIZE, SIZE, 3), np.uint8)
    return Sample(input_ids=ids, labels=labels, loss_weights=loss_weights(labels, reduction),
                  tiles=t, tile_flags=np.ones(tiles, np.int32), truncated=False, source="syn",
                  line=uid + 1)


def geom(b=3, s=20, t=6, row=None, per_row=None):
    return BatchGeometry(batch_size=b, seq_len=s, max_tiles=t, image_size=SIZE, pad_id=PAD,
                         image_token_id=CTX, num_image_tokens=NIT, max_tiles_per_row=row,
                         max_samples_per_row=per_row)


def test_shifted_labels_and_weights_by_hand():
    ids = np.array([7, 8, 9, 10, 11], np.int32)
    trained = np.array([False, False, True, True, False])
    np.testing.assert_array_equal(shifted_labels(ids, trained), [-100, 9, 10, -100, -100])
    labels = np.array([-100, 9, 10, 11, -100], np.int32)
    np.testing.assert_allclose(loss_weights(labels, "token"), [0, 1, 1, 1, 0])
    np.testing.assert_allclose(loss_weights(labels, "sample"), [0, 1 / 3, 1 / 3, 1 / 3, 0])
    np.testing.assert_allclose(loss_weights(labels, "square"), [0] + [3 ** -0.5] * 3 + [0],
                               rtol=1e-6)


def test_first_fit_rows_segments_positions():
    bb = BatchBuilder(geom())
    samples = [make_sample(k, n, 0) for k, n in enumerate([12, 10, 8, 5, 9])]
    assert all(bb.add(s) for s in samples)
    # 12 -> row 0; 10 -> row 1; 8 -> row 0 (20); 5 -> row 1 (15); 9 -> row 2.
    assert [[s.line - 1 for s in r] for r in bb.rows] == [[0, 2], [1, 3], [4]]
    assert not bb.add(make_sample(9, 12, 0))  # rows have 0, 5 and 11 tokens left
    b = finalize_batch(bb.build(), bb.geom)
    assert b["segment_ids"][0].tolist() == [1] * 12 + [2] * 8
    assert b["segment_ids"][1].tolist() == [1] * 10 + [2] * 5 + [0] * 5
    assert b["positions"][1].tolist() == list(range(10)) + list(range(5)) + [0] * 5
    np.testing.assert_array_equal(b["input_ids"][1, :10], samples[1].input_ids)
    np.testing.assert_array_equal(b["input_ids"][1, 10:15], samples[3].input_ids)
    assert (b["input_ids"][1, 15:] == PAD).all() and (b["labels"][1, 15:] == -100).all()
    np.testing.assert_array_equal(b["labels"][0, 12:], samples[2].labels)
    assert b["labels"][0, 11] == -100  # last token of a sample never predicts the next one
    assert (b["loss_weights"] == (b["labels"] != -100)).all()


def test_one_sample_per_row_when_packing_is_off():
    bb = BatchBuilder(geom(per_row=1))
    assert all(bb.add(make_sample(k, 5, 0)) for k in range(3))
    assert not bb.add(make_sample(3, 5, 0))
    assert [len(r) for r in bb.rows] == [1, 1, 1]
    assert finalize_batch(bb.build(), bb.geom)["segment_ids"].max() == 1


def test_tiles_budget_and_buffer_order():
    bb = BatchBuilder(geom(b=2, s=40, t=6, row=4))
    a, b_, c = make_sample(1, 12, 3), make_sample(2, 10, 2), make_sample(3, 6, 1)
    assert bb.add(a) and bb.add(b_)  # b_ would exceed row 0's 4 tiles -> row 1
    assert [[s.line - 1 for s in r] for r in bb.rows] == [[1], [2]]
    assert bb.add(c)  # 1 tile fits row 0 (4 of 4)
    assert not bb.add(make_sample(4, 6, 1))  # batch buffer of 6 is full
    assert bb.add(make_sample(5, 5, 0))  # text-only still fits
    batch = finalize_batch(bb.build(), bb.geom)
    # buffer order: row 0 (sample 1's 3 tiles, sample 3's 1 tile), then row 1, then padding
    fills = [10, 11, 12, 30, 20, 21]
    want = ((np.array(fills)[:, None] / 255.0 - MEAN) / STD)
    np.testing.assert_allclose(batch["pixel_values"][:, :, 0, 0], want, rtol=0, atol=1e-6)
    assert batch["image_flags"].tolist() == [1] * 6
    assert batch["pixel_values"].shape == (6, 3, SIZE, SIZE)
    assert int((batch["input_ids"] == CTX).sum()) == NIT * 6
    # exactly the training-batch contract: its fields, dtypes and (micro-batch) shapes
    shapes = BatchSpec(grad_accum=1, rows=2, seq_len=40, tiles=6, image_size=SIZE,
                       channels=3, num_image_tokens=NIT).global_shapes()
    assert {k: (v.dtype, (1, *v.shape)) for k, v in batch.items()} == {
        k: (np.dtype(BATCH_DTYPES[k]), shapes[k]) for k in shapes}


def _stream(specs):
    """grain IterDataset over Samples / Skipped built from (uid, length, tiles) or reasons."""
    def build(spec):
        if isinstance(spec, str):
            return Skipped(spec, "synthetic", "syn", 0)
        return make_sample(*spec)

    return grain.MapDataset.source(list(specs)).map(build).to_iter_dataset()


def _random_specs(n, seed, bad_every=0):
    rng = np.random.default_rng(seed)
    out = []
    for uid in range(n):
        if bad_every and uid % bad_every == bad_every // 2:
            out.append("missing_image")
            continue
        tiles = int(rng.integers(0, 4))
        out.append((uid, int(rng.integers(3 + NIT * tiles + 2, 41)), tiles))
    return out


def _pack(specs, g, lookahead, **kw):
    kw.setdefault("max_bad_fraction", 1.0)
    kw.setdefault("bad_check_min_samples", 1)
    ds = PackIterDataset(_stream(specs), g, lookahead=lookahead, **kw)
    return iter(ds.map(functools.partial(finalize_batch, geom=g)))


@pytest.mark.parametrize("lookahead", [0, 4])
def test_every_sample_once_whole_and_tokens_conserved(lookahead):
    specs = _random_specs(120, seed=0, bad_every=10)
    samples = {s[0]: make_sample(*s) for s in specs if not isinstance(s, str)}
    g = geom(b=2, s=48, t=8)
    seen, tokens, counted = [], 0, 0
    for batch in _pack(specs, g, lookahead):
        counted += int(batch["stats_num_samples"])
        k = 0
        for b in range(g.batch_size):
            seg = batch["segment_ids"][b]
            for sid in range(1, seg.max() + 1):
                idx = np.flatnonzero(seg == sid)
                assert (np.diff(idx) == 1).all()  # contiguous
                uid = int(batch["input_ids"][b, idx[0]]) - 100
                s = samples[uid]
                np.testing.assert_array_equal(batch["input_ids"][b, idx], s.input_ids)
                np.testing.assert_array_equal(batch["labels"][b, idx], s.labels)
                np.testing.assert_array_equal(batch["positions"][b, idx], np.arange(len(s)))
                t = len(s.tiles)
                got = batch["pixel_values"][k:k + t, 0, 0, 0]
                want = ((np.arange(t) + uid * 10) % 256 / 255.0 - MEAN[0]) / STD[0]
                np.testing.assert_allclose(got, want, atol=1e-6)
                k += t
                seen.append(uid)
                tokens += len(idx)
        assert batch["image_flags"][:k].all() and not batch["image_flags"][k:].any()
        assert (batch["input_ids"][batch["segment_ids"] == 0] == PAD).all()
    assert sorted(seen) == sorted(samples)
    assert counted == len(samples)
    assert tokens == sum(len(s) for s in samples.values())


def test_sample_that_cannot_fit_an_empty_batch_is_an_error():
    with pytest.raises(DataError, match="cannot fit an empty batch"):
        next(_pack([(0, 30, 0)], geom(s=20), 0))


def test_lookahead_packs_tighter():
    specs = _random_specs(200, seed=1)
    g = geom(b=2, s=48, t=8)
    n0 = sum(1 for _ in _pack(specs, g, 0))
    n8 = sum(1 for _ in _pack(specs, g, 8))
    assert n8 < n0


@pytest.mark.parametrize("lookahead", [0, 5])
def test_resume_is_exact(lookahead):
    specs = _random_specs(150, seed=2, bad_every=7)
    g = geom(b=2, s=48, t=8)
    it = _pack(specs, g, lookahead)
    for _ in range(7):
        next(it)
    state = json.dumps(it.get_state())
    want = [next(it) for _ in range(9)]
    again = _pack(specs, g, lookahead)
    again.set_state(json.loads(state))
    for a, b in zip(want, (next(again) for _ in range(9)), strict=True):
        assert a.keys() == b.keys()
        for key in a:
            np.testing.assert_array_equal(a[key], b[key], err_msg=key)


def test_bad_fraction_limit_stops_the_run():
    specs = _random_specs(100, seed=3, bad_every=2)  # half the records are bad
    with pytest.raises(DataError, match=r"records were bad .*max_bad_fraction 0.2.*missing_image"):
        for _ in _pack(specs, geom(s=48, t=8), 0, max_bad_fraction=0.2,
                       bad_check_min_samples=20):
            pass
    # under the limit: counted, reported per batch, never raised
    total_bad = sum(int(b["stats_num_bad"]) for b in _pack(
        specs, geom(s=48, t=8), 0, max_bad_fraction=0.6, bad_check_min_samples=20))
    assert total_bad == sum(isinstance(s, str) for s in specs)
