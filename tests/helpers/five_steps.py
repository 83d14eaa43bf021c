"""Five float32 training steps of the tiny model from fixed weights and batches.

Weights come from a numpy generator keyed by each parameter's dotted path and batches from a
fixed numpy generator, so the losses depend only on the training-step math (model, chunked
cross-entropy, accumulation, clipping, AdamW), not on initialisers or the data pipeline. Speed
work compares these losses against values recorded from the implementation before it.
"""

from __future__ import annotations

import zlib

import jax
import numpy as np
from flax import nnx

from mini_internvl_jax.placement import to_global
from mini_internvl_jax.sharding import make_mesh
from mini_internvl_jax.train.config import train_config_from_dict
from mini_internvl_jax.train.setup import build

IMAGE_TOKEN = 5  # tiny-qwen2's <IMG_CONTEXT>
ROWS, SEQ, GRAD_ACCUM, TILES_PER_SAMPLE = 4, 64, 2, 1


def _path_weights(model) -> None:
    """Overwrite every parameter with N(0, 0.05^2) (norm scales 1 + that) keyed by its path."""
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        name = ".".join(str(p) for p in path)
        rng = np.random.default_rng(zlib.crc32(name.encode()))
        w = 0.05 * rng.standard_normal(var.shape).astype(np.float32)
        if name.endswith("norm.weight") or ".norm" in name and name.endswith("weight"):
            w += 1.0
        var[...] = jax.device_put(w.astype(var.dtype), var[...].sharding)


def _batch(step: int, vocab: int, num_image_tokens: int, image_size: int) -> dict:
    """One step: GRAD_ACCUM micro-batches of ROWS/GRAD_ACCUM packed rows (2 samples + padding)."""
    rng = np.random.default_rng([1234, step])
    rows, a = ROWS // GRAD_ACCUM, GRAD_ACCUM
    ids = np.zeros((a, rows, SEQ), np.int32)
    labels = np.full((a, rows, SEQ), -100, np.int32)
    weights = np.zeros((a, rows, SEQ), np.float32)
    pos = np.zeros((a, rows, SEQ), np.int32)
    seg = np.zeros((a, rows, SEQ), np.int32)
    tiles = rows * 2 * TILES_PER_SAMPLE
    pixels = rng.standard_normal((a, tiles, 3, image_size, image_size)).astype(np.float32)
    flags = np.ones((a, tiles), np.int32)
    for m in range(a):
        for r in range(rows):
            lo = 0
            for k, length in enumerate((int(rng.integers(20, 30)), int(rng.integers(20, 30)))):
                text = rng.integers(0, vocab - 1, length).astype(np.int32)
                text[text >= IMAGE_TOKEN] += 1
                text[1:1 + num_image_tokens * TILES_PER_SAMPLE] = IMAGE_TOKEN
                sl = slice(lo, lo + length)
                ids[m, r, sl], seg[m, r, sl], pos[m, r, sl] = text, k + 1, np.arange(length)
                target = np.where(text[1:] == IMAGE_TOKEN, -100, text[1:])
                labels[m, r, lo:lo + length - 1] = target
                weights[m, r, lo:lo + length - 1] = 1.0 / np.sqrt(length)  # InternVL-style
                lo += length
    return {"input_ids": ids, "labels": labels, "loss_weights": weights, "positions": pos,
            "segment_ids": seg, "pixel_values": pixels, "image_flags": flags}


def tiny_setup(**overrides):
    """(Setup, mesh, batch(step) -> global arrays) of the tiny float32 run on one CPU device."""
    compute = {"dtype": "float32", "param_dtype": "float32", "remat": "full",
               "scan_layers": True, "attention_impl": "xla", **overrides.pop("compute", {})}
    cfg = train_config_from_dict({
        "model": "tiny-qwen2", "batch_size": ROWS, "seq_len": SEQ,
        "max_tiles": ROWS // GRAD_ACCUM * 2 * TILES_PER_SAMPLE, "total_steps": 100,
        "compute": compute, "loss_chunk": 16,
        # no_decay as when RECORDED was taken (every norm exempt; the default now decays the
        # LLM's RMSNorm weights, as InternVL2's fine-tuning does)
        "optim": {"lr": 3e-3, "warmup_steps": 0, "weight_decay": 0.1, "clip_norm": 1.0,
                  "grad_accum": GRAD_ACCUM, "no_decay": ["norm", "bias$"]},
        "mesh": {"data": 1, "fsdp": 1, "tensor": 1}, **overrides})
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    s = build(cfg, mesh, init_params=_path_weights)
    mc = s.model_cfg

    def batch(step: int) -> dict:
        host = _batch(step, mc.llm.vocab_size, mc.num_image_tokens, mc.vision.image_size)
        return to_global(host, s.batch_sh)

    return s, mesh, batch


def five_step_losses(**overrides) -> list[float]:
    """Losses of steps 1..5 (float32 compute and master weights, remat, chunked CE, packed rows,
    2 micro-batches, clipping, AdamW with weight decay) on one CPU device."""
    s, mesh, batch = tiny_setup(**overrides)
    state, losses = s.state, []
    with jax.set_mesh(mesh):
        for step in range(5):
            state, m = s.step_fn(state, batch(step))
            losses.append(float(np.asarray(m["loss"])))
    return losses
