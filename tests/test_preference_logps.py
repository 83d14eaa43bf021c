"""Per-answer log-probs of packed preference rows against transformers' InternVL, answer by
answer: two pairs (1 and 2 image tiles) packed by the real pair builder, all four answers in one
row (packed) and one pair per row; each answer's sum of token log-probs within 1e-5 relative.
The rejected answers read the chosen answers' tiles (stored once in the tile buffer)."""

import jax
import numpy as np
import torch
import transformers
from flax import nnx

from mini_internvl_jax.convert.mapping import model_rules
from mini_internvl_jax.data.packing import BatchGeometry, finalize_batch
from mini_internvl_jax.data.preference import PairBatchBuilder, PairSample
from mini_internvl_jax.data.processing import Sample, loss_weights, shifted_labels
from mini_internvl_jax.train.preference_step import sequence_logps
from tests.helpers import hf_reference as ref
from tests.helpers import parity as P

PER_TILE = 4


def _pairs(seed=0):
    """[(PairSample, [(HF ids, HF labels) chosen, rejected])] sharing prompt and tiles."""
    rng = np.random.RandomState(seed)
    out = []
    for k, (tiles, lc, lr) in enumerate(((1, 13, 9), (2, 15, 18))):
        prompt = 3 + PER_TILE * tiles
        pix = rng.randint(0, 256, size=(tiles, 56, 56, 3)).astype(np.uint8)
        ids_c, _ = P.sample_ids(rng, lc, tiles, PER_TILE, prompt=3)
        ids_r = ids_c.copy() if lr <= lc else np.concatenate([ids_c, ids_c[:lr - lc]])
        ids_r = ids_r[:lr]
        ids_r[prompt:] = rng.randint(10, 290, size=lr - prompt)  # another answer
        samples, hf = [], []
        for ids in (ids_c, ids_r):
            trained = np.arange(len(ids)) >= prompt
            labels = shifted_labels(ids.astype(np.int32), trained)
            samples.append(Sample(input_ids=ids.astype(np.int32), labels=labels,
                                  loss_weights=loss_weights(labels, "token"), tiles=pix,
                                  tile_flags=np.ones(tiles, np.int32), truncated=False,
                                  source="t", line=k))
            hf.append((ids, np.where(trained, ids, P.IGNORE)))
        out.append((PairSample(*samples), hf))
    return out


def _batch(pairs, per_row):
    """Two rows of 64 tokens (one shape, one compile): all pairs in row 0, or one per row."""
    geom = BatchGeometry(batch_size=2, seq_len=64, max_tiles=4, image_size=56, pad_id=0,
                         image_token_id=ref.IMAGE_TOKEN, num_image_tokens=PER_TILE,
                         max_samples_per_row=per_row)
    builder = PairBatchBuilder(geom)
    for p, _ in pairs:
        assert builder.add(p)
    return finalize_batch(builder.build(), geom)


def test_pair_logps_match_transformers_packed_and_one_pair_per_row():
    hf_cfg, cfg = ref.internvl_pair("qwen2")
    torch_model = ref.randomize_(transformers.InternVLForConditionalGeneration(hf_cfg)).eval()
    model = P.model_from_torch(cfg, model_rules(cfg, "native"), torch_model.state_dict())
    pairs = _pairs()
    packed = _batch(pairs, per_row=2)
    assert not packed["segment_ids"][1].any()
    real = packed["pixel_values"][packed["image_flags"] == 1]
    assert len(real) == 3  # each pair's tiles once
    want, tile = [], 0
    with torch.no_grad():
        for pair, hf in pairs:
            n = len(pair.tiles)
            px = torch.tensor(real[tile:tile + n])
            tile += n
            for ids, labels in hf:
                logits = torch_model(input_ids=torch.tensor(ids[None]), pixel_values=px).logits
                lp = torch.log_softmax(logits[0, :-1].double(), -1)
                tgt = torch.tensor(labels[1:])
                mask = tgt != P.IGNORE
                want.append(float(lp[mask].gather(-1, tgt[mask][:, None]).sum()))
    want = np.array(want).reshape(2, 2)  # [pair, chosen/rejected]
    graphdef, state = nnx.split(model)

    @jax.jit
    def logps(state, batch):
        return sequence_logps(nnx.merge(graphdef, state), batch, 4, packed=True, loss_chunk=16)

    for per_row in (2, 1):
        batch = packed if per_row == 2 else _batch(pairs, per_row=1)
        batch = {k: v for k, v in batch.items() if k not in ("ref_logps", "pair_meta")}
        c, r, n_c, n_r = logps(state, batch)
        got = np.stack([np.asarray(c)[:2], np.asarray(r)[:2]], axis=1)
        np.testing.assert_allclose(got, want, rtol=1e-5)
        np.testing.assert_array_equal(np.asarray(n_c)[:2], [13 - 7, 15 - 11])
        np.testing.assert_array_equal(np.asarray(n_r)[:2], [9 - 7, 18 - 11])
        assert not np.asarray(n_c)[2:].any()  # empty pair slots
