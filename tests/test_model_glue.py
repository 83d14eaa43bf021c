"""InternVL glue: pixel shuffle order, the image-token splice, and parameter counts."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx

from mini_internvl_jax import configlib, load_model_config
from mini_internvl_jax.config import ComputeConfig
from mini_internvl_jax.models import InternVLModel, pixel_shuffle
from mini_internvl_jax.models.internvl import ImageTokenMismatchError, splice_image_embeddings


def numpy_space_to_depth(x: np.ndarray, s: int, version: str) -> np.ndarray:
    """Element-by-element construction of the documented (dy, dx, c) order."""
    n, h, w, c = x.shape
    out = np.zeros((n, (h // s) * (w // s), s * s * c), x.dtype)
    for r in range(h // s):
        for col in range(w // s):
            token = r * (w // s) + col if version == "v2" else col * (h // s) + r
            for dy in range(s):
                for dx in range(s):
                    ch = dy * s * c + dx * c
                    out[:, token, ch:ch + c] = x[:, s * r + dy, s * col + dx]
    return out


def internvl_torch_pixel_shuffle(x: torch.Tensor, scale: float, version: str) -> torch.Tensor:
    """The original InternVLChatModel.pixel_shuffle, verbatim in behaviour."""
    n, w, h, c = x.size()
    x = x.view(n, w, int(h * scale), int(c / scale))
    x = x.permute(0, 2, 1, 3).contiguous()
    x = x.view(n, int(h * scale), int(w * scale), int(c / (scale * scale)))
    if version != "v1":
        x = x.permute(0, 2, 1, 3).contiguous()
    return x


@pytest.mark.parametrize("version", ["v1", "v2"])
@pytest.mark.parametrize("h,c", [(4, 3), (8, 5), (32, 2)])
def test_pixel_shuffle_matches_numpy_and_original(version, h, c):
    x = np.random.RandomState(0).randn(2, h, h, c).astype(np.float32)
    ours = np.asarray(pixel_shuffle(jnp.asarray(x), 2, version))
    np.testing.assert_array_equal(ours, numpy_space_to_depth(x, 2, version))
    orig = internvl_torch_pixel_shuffle(torch.tensor(x), 0.5, version).numpy()
    np.testing.assert_array_equal(ours, orig.reshape(2, -1, 4 * c))


def test_pixel_shuffle_rejects_odd_grid():
    with pytest.raises(ValueError, match="not divisible"):
        pixel_shuffle(jnp.zeros((1, 5, 5, 2)), 2)


def _splice_inputs():
    rng = np.random.RandomState(1)
    text = rng.randn(2, 10, 3).astype(np.float32)
    ids = np.full((2, 10), 7, np.int32)
    ids[0, 1:3] = 9   # tile 0
    ids[0, 5:7] = 9   # tile 1
    ids[1, 0:2] = 9   # tile 3 (tile 2 is padding)
    vision = rng.randn(4, 2, 3).astype(np.float32)
    flags = np.array([1, 1, 0, 1], np.int32)
    return text, ids, vision, flags


@pytest.mark.parametrize("jit", [False, True])
def test_splice_fills_placeholders_in_order_and_skips_padding(jit):
    text, ids, vision, flags = _splice_inputs()
    fn = jax.jit(splice_image_embeddings, static_argnums=(4,)) if jit else splice_image_embeddings
    out = np.asarray(fn(jnp.asarray(text), jnp.asarray(ids), jnp.asarray(vision),
                        jnp.asarray(flags), 9))
    expected = text.copy()
    expected[0, 1:3] = vision[0]
    expected[0, 5:7] = vision[1]
    expected[1, 0:2] = vision[3]
    np.testing.assert_array_equal(out, expected)


def test_splice_count_mismatch_is_an_error_eager_and_jit():
    text, ids, vision, flags = _splice_inputs()
    ids[1, 4] = 9  # one placeholder too many
    with pytest.raises(ImageTokenMismatchError, match="5 image tokens|<IMG_CONTEXT>"):
        splice_image_embeddings(jnp.asarray(text), jnp.asarray(ids), jnp.asarray(vision),
                                jnp.asarray(flags), 9)
    fn = jax.jit(splice_image_embeddings, static_argnums=(4,))
    with pytest.raises(Exception, match="IMG_CONTEXT"):
        jax.block_until_ready(fn(jnp.asarray(text), jnp.asarray(ids), jnp.asarray(vision),
                                 jnp.asarray(flags), 9))


def test_text_only_batch_with_image_tokens_is_an_error():
    cfg = load_model_config("tiny-qwen2")
    with nnx.use_eager_sharding(False):
        model = InternVLModel(cfg, rngs=nnx.Rngs(0))
    ids = np.full((1, 6), 11, np.int32)
    ids[0, 2] = cfg.image_token_id
    with pytest.raises(ImageTokenMismatchError):
        model(jnp.asarray(ids))


def count_params(preset: str) -> dict[str, int]:
    cfg = load_model_config(preset)
    with nnx.use_eager_sharding(False):
        # stacked layers: one traced layer, so counting a 36-layer 8B model takes ~1 s
        abstract = nnx.eval_shape(lambda: InternVLModel(cfg, ComputeConfig(scan_layers=True),
                                                        rngs=nnx.Rngs(0)))
    counts = {}
    for part in ("vision", "projector", "llm"):
        leaves = jax.tree.leaves(nnx.state(getattr(abstract, part), nnx.Param))
        counts[part] = sum(int(np.prod(x.shape)) for x in leaves)
    counts["total"] = sum(counts.values())
    return counts


@pytest.mark.parametrize("preset,total,vision,projector", [
    ("mini-internvl-1b", 0.94e9, 304.01e6, 4.48e6),
    ("mini-internvl-2b", 2.21e9, 304.01e6, 12.60e6),
    ("mini-internvl-4b", 4.15e9, 304.01e6, 22.03e6),
])
def test_preset_parameter_counts_match_published_totals(preset, total, vision, projector):
    counts = count_params(preset)
    print(f"{preset}: " + ", ".join(f"{k}={v / 1e6:.2f}M" for k, v in counts.items()))
    assert abs(counts["total"] / total - 1) < 0.01
    assert abs(counts["vision"] / vision - 1) < 0.001
    assert abs(counts["projector"] / projector - 1) < 0.001


NEW_PRESETS = {  # the model card's rounded total of each released checkpoint
    "internvl2_5-1b": 938e6, "internvl2_5-2b": 2.21e9, "internvl2_5-4b": 3.71e9,
    "internvl2_5-8b": 8.08e9, "internvl3-1b": 938e6, "internvl3-2b": 2.09e9,
    "internvl3-8b": 7.94e9, "internvl3_5-1b": 1.06e9, "internvl3_5-2b": 2.35e9,
    "internvl3_5-4b": 4.73e9, "internvl3_5-8b": 8.53e9,
}


def test_new_presets_have_their_stated_parameter_counts():
    """InternVL2.5 / 3 / 3.5 presets: abstract-shape counts equal the exact ViT / MLP / LLM
    counts each YAML states, and round to the model card's total."""
    for preset, card in NEW_PRESETS.items():
        text = configlib.preset_root().joinpath("models", f"{preset}.yaml").read_text()
        m = re.search(r"# parameters: ([\d,]+) = ViT ([\d,]+) \+ MLP ([\d,]+) \+ LLM ([\d,]+)",
                      text)
        assert m, f"{preset}: no '# parameters:' line"
        total, vit, mlp, llm = (int(g.replace(",", "")) for g in m.groups())
        counts = count_params(preset)
        assert (counts["total"], counts["vision"], counts["projector"], counts["llm"]) == \
            (total, vit, mlp, llm), preset
        scale = 1e6 if card < 1e9 else 1e7  # cards print 938M, 2.21B
        assert round(total / scale) == round(card / scale), (preset, total)
