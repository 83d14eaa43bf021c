"""Packed = unpacked (Phi-3 text model): one packed row of three samples (two with images,
one text-only) built by the real packer gives the loss and gradients of the three samples run
one by one through transformers' InternVL, combined with InternVL's packed-training weighting:

    loss = sum_i w_i * sum_t ce_it / sum_i w_i * n_i,   w_i = 1 (`token`) or 1/sqrt(n_i)
    (`square`), n_i = supervised tokens of sample i.
"""

import numpy as np
import torch
import transformers

from mini_internvl_jax.convert.mapping import model_rules
from mini_internvl_jax.data.packing import BatchBuilder, BatchGeometry, finalize_batch
from mini_internvl_jax.data.processing import Sample, loss_weights, shifted_labels
from tests.helpers import hf_reference as ref
from tests.helpers import parity as P

TOL = 1e-5
PER_TILE = 4


def _samples(reduction: str, seed: int = 0) -> list[tuple[Sample, np.ndarray]]:
    """(Sample, HF-style unshifted labels) for lengths 12 / 8 / 14 with 1 / 0 / 2 tiles."""
    rng = np.random.RandomState(seed)
    out = []
    for k, (length, tiles) in enumerate(((12, 1), (8, 0), (14, 2))):
        ids, hf_labels = P.sample_ids(rng, length, tiles, PER_TILE, prompt=2)
        labels = shifted_labels(ids.astype(np.int32), hf_labels != P.IGNORE)
        pix = rng.randint(0, 256, size=(tiles, 56, 56, 3)).astype(np.uint8)
        sample = Sample(input_ids=ids.astype(np.int32), labels=labels,
                        loss_weights=loss_weights(labels, reduction), tiles=pix,
                        tile_flags=np.ones(tiles, np.int32), truncated=False, source="t",
                        line=k)
        out.append((sample, hf_labels))
    return out


def _packed(samples) -> dict[str, np.ndarray]:
    geom = BatchGeometry(batch_size=1, seq_len=36, max_tiles=4, image_size=56, pad_id=0,
                         image_token_id=ref.IMAGE_TOKEN, num_image_tokens=PER_TILE)
    builder = BatchBuilder(geom)
    for s, _ in samples:
        assert builder.add(s)
    batch = finalize_batch(builder.build(), geom)
    assert builder.num_samples == 3 and batch["segment_ids"].max() == 3
    return {k: batch[k] for k in ("input_ids", "labels", "loss_weights", "positions",
                                  "segment_ids", "pixel_values", "image_flags")}


def _reference(torch_model, samples, pixel_values, reduction):
    """InternVL's weighting over separate single-sample runs (torch autograd)."""
    torch_model.zero_grad()
    total, norm, tile = 0.0, 0.0, 0
    for s, hf_labels in samples:
        n_tiles = len(s.tiles)
        px = torch.tensor(pixel_values[tile:tile + n_tiles]) if n_tiles else None
        tile += n_tiles
        logits = torch_model(input_ids=torch.tensor(s.input_ids[None], dtype=torch.long),
                             pixel_values=px).logits
        labels = torch.tensor(hf_labels[None])
        ce = torch.nn.functional.cross_entropy(logits[0, :-1], labels[0, 1:],
                                               ignore_index=P.IGNORE, reduction="sum")
        n = int((labels[0, 1:] != P.IGNORE).sum())
        w = 1.0 if reduction == "token" else 1.0 / np.sqrt(n)
        total, norm = total + w * ce, norm + w * n
    loss = total / norm
    loss.backward()
    return float(loss.detach()), P.torch_grads(torch_model)


def test_packed_row_equals_separate_samples_token_and_square():
    # Phi-3's LongRoPE keys on the largest position (original_max 32 < the 36-token row), so
    # positions that fail to restart per sample show; plain RoPE is blind to a shift.
    hf_cfg, cfg = ref.internvl_pair("phi3")
    torch_model = ref.randomize_(transformers.InternVLForConditionalGeneration(hf_cfg))
    rules = model_rules(cfg, "native")
    trainer = P.Trainer(P.model_from_torch(cfg, rules, torch_model.state_dict()), frozenset())
    for reduction in ("token", "square"):
        samples = _samples(reduction)
        batch = _packed(samples)
        metrics = trainer.step(P.stack_micro([batch]))
        got = P.to_torch_names(trainer.grads(), rules)
        real = batch["pixel_values"][batch["image_flags"] == 1]
        want_loss, want = _reference(torch_model, samples, real, reduction)
        loss_err = abs(float(metrics["loss"]) - want_loss) / abs(want_loss)
        err, name = P.worst(got, want)
        print(f"{reduction}: loss rel err {loss_err:.2e}, worst gradient {err:.2e} ({name})")
        assert loss_err <= TOL, (reduction, float(metrics["loss"]), want_loss)
        assert err <= TOL, (reduction, name, err)
