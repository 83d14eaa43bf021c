"""Parity of our models with transformers (torch CPU, float32) through the converter's mapping."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mini_internvl_jax.config import ComputeConfig, ModelConfig, VisionConfig
from mini_internvl_jax.convert.mapping import llm_rules, model_rules, vision_rules
from mini_internvl_jax.models import InternViT, InternVLModel
from tests.helpers import hf_reference as ref
from tests.helpers.torch_rules import load_rules_into, torch_state_reader

TINY_VISION = VisionConfig(hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64,
                           image_size=56, patch_size=14)


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def build_ours(cfg: ModelConfig, rules, state_dict, compute: ComputeConfig | None = None
               ) -> InternVLModel:
    compute = compute or ComputeConfig()
    with nnx.use_eager_sharding(False):
        model = InternVLModel(cfg, compute, rngs=nnx.Rngs(0))
    load_rules_into(model, rules, torch_state_reader(state_dict), scan=compute.scan_layers)
    return model


def llm_model(pair, *, scan=False, dtype="float32"):
    hf_cfg, llm_cfg, cls = pair
    torch_model = ref.randomize_(cls(hf_cfg))
    cfg = ModelConfig(vision=TINY_VISION, llm=llm_cfg, image_token_id=ref.IMAGE_TOKEN)
    rules = llm_rules(llm_cfg, body="model.", head="lm_head")
    return torch_model, build_ours(cfg, rules, torch_model.state_dict(),
                                   ComputeConfig(dtype=dtype, scan_layers=scan))


def torch_logits(model, ids, positions=None, **kw):
    with torch.no_grad():
        pos = None if positions is None else torch.tensor(np.asarray(positions))
        return model(torch.tensor(np.asarray(ids), dtype=torch.long), position_ids=pos,
                     **kw).logits.numpy()


@pytest.mark.parametrize("name,pair", [
    ("qwen2", ref.qwen2_pair), ("llama_gqa4", lambda: ref.llama_pair(heads=8, kv_heads=2)),
    ("qwen2_tied", lambda: ref.qwen2_pair(tie=True)), ("qwen3", ref.qwen3_pair),
])
def test_causal_lm_parity(name, pair):
    torch_model, ours = llm_model(pair())
    ids = np.random.RandomState(1).randint(0, ref.VOCAB, size=(2, 24))
    err = rel_err(ours(jnp.asarray(ids, jnp.int32)), torch_logits(torch_model, ids))
    assert err <= 1e-4, f"{name}: relative max error {err}"


@pytest.mark.parametrize("seq_len", [20, 48], ids=["short", "long"])
def test_phi3_longrope_parity(seq_len):
    """original_max_position_embeddings=32: 20 tokens use short_factor, 48 use long_factor."""
    torch_model, ours = llm_model(ref.phi3_pair(original_max=32))
    ids = np.random.RandomState(2).randint(0, ref.VOCAB, size=(1, seq_len))
    err = rel_err(ours(jnp.asarray(ids, jnp.int32)), torch_logits(torch_model, ids))
    assert err <= 1e-4, err


def test_packed_segments_equal_separate_reference_runs():
    """Two samples packed in one row (positions restart, segment ids) == HF on each alone."""
    torch_model, ours = llm_model(ref.qwen2_pair())
    rng = np.random.RandomState(3)
    a, b = rng.randint(0, ref.VOCAB, 9), rng.randint(0, ref.VOCAB, 7)
    ids = np.zeros((1, 20), np.int32)
    ids[0, :9], ids[0, 9:16] = a, b
    seg = np.array([[1] * 9 + [2] * 7 + [0] * 4], np.int32)
    pos = np.array([list(range(9)) + list(range(7)) + [0] * 4], np.int32)
    logits = np.asarray(ours(jnp.asarray(ids), positions=jnp.asarray(pos),
                             segment_ids=jnp.asarray(seg)))
    ref_a = torch_logits(torch_model, a[None])[0]
    ref_b = torch_logits(torch_model, b[None])[0]
    assert rel_err(logits[0, :9], ref_a) <= 1e-4
    assert rel_err(logits[0, 9:16], ref_b) <= 1e-4
    # positions default to restarting per segment when only segment ids are given
    logits2 = np.asarray(ours(jnp.asarray(ids), segment_ids=jnp.asarray(seg)))
    np.testing.assert_allclose(logits2[0, :16], logits[0, :16], rtol=0, atol=1e-5)


def test_scan_layers_and_remat_match_reference():
    pair = ref.qwen2_pair(layers=3)
    torch_model, _ = llm_model(pair)
    cfg = ModelConfig(vision=TINY_VISION, llm=pair[1], image_token_id=ref.IMAGE_TOKEN)
    ours = build_ours(cfg, llm_rules(pair[1], body="model.", head="lm_head"),
                      torch_model.state_dict(), ComputeConfig(scan_layers=True, remat="full"))
    ids = np.random.RandomState(4).randint(0, ref.VOCAB, size=(2, 16))
    assert rel_err(ours(jnp.asarray(ids, jnp.int32)), torch_logits(torch_model, ids)) <= 1e-4

    # gradients through scan+remat equal torch autograd on the same loss
    ids_t = torch.tensor(ids, dtype=torch.long)
    loss_t = torch_model(ids_t).logits.float().logsumexp(-1).mean()
    loss_t.backward()
    g_ref = torch_model.model.layers[1].mlp.down_proj.weight.grad.numpy().T

    def loss_fn(m):
        return jax.nn.logsumexp(m(jnp.asarray(ids, jnp.int32)), axis=-1).mean()

    grads = nnx.grad(loss_fn)(ours)
    g_ours = np.asarray(grads["llm"]["layers"]["layers"]["down_proj"]["kernel"][...])[1]
    assert rel_err(g_ours, g_ref) <= 1e-4


@pytest.mark.parametrize("norm_type,qk_norm,qkv_bias", [
    ("layer_norm", False, True),   # InternViT-300M
    ("rms_norm", True, False),     # InternViT-6B style
])
def test_vision_parity(norm_type, qk_norm, qkv_bias):
    hf_cfg, cfg = ref.vision_pair(norm_type, qk_norm, qkv_bias)
    torch_model = ref.randomize_(transformers.InternVLVisionModel(hf_cfg))
    sd = {"model.vision_tower." + k: v for k, v in torch_model.state_dict().items()}
    with nnx.use_eager_sharding(False):
        ours = InternViT(cfg, rngs=nnx.Rngs(0))

    class Holder(nnx.Module):  # the mapping addresses the tower as `vision`
        def __init__(self, vision):
            self.vision = vision

    load_rules_into(Holder(ours), vision_rules(cfg, "native"), torch_state_reader(sd),
                    scan=False)
    px = np.random.RandomState(5).randn(3, 3, 56, 56).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(torch.tensor(px)).last_hidden_state.numpy()
    assert rel_err(ours(jnp.asarray(px)), expected) <= 1e-4


def test_position_table_bicubic_resize_matches_torch():
    from mini_internvl_jax.models.vision import resize_position_grid

    table = np.random.RandomState(6).randn(8, 8, 5).astype(np.float32)
    for out in (8, 5, 12, 16):
        ours = resize_position_grid(jnp.asarray(table), out, out)
        theirs = torch.nn.functional.interpolate(
            torch.tensor(table).permute(2, 0, 1)[None], size=(out, out), mode="bicubic",
            align_corners=False)[0].permute(1, 2, 0).numpy()
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-5)


def test_select_layer_matches_vision_feature_layer():
    """select_layer -2 takes the second-to-last block's output, as HF vision_feature_layer."""
    hf_cfg, cfg = ref.internvl_pair("qwen2", vision_layers=3, llm_layers=1)
    hf_cfg.vision_feature_layer = -2
    cfg = cfg.replace(select_layer=-2)
    torch_model = ref.randomize_(transformers.InternVLForConditionalGeneration(hf_cfg))
    ours = build_ours(cfg, model_rules(cfg, "native"), torch_model.state_dict())
    ids = ref.internvl_input_ids([1], seq_len=12)
    px = np.random.RandomState(8).randn(1, 3, 56, 56).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor(ids, dtype=torch.long),
                               pixel_values=torch.tensor(px)).logits.numpy()
    assert rel_err(ours(jnp.asarray(ids), jnp.asarray(px)), expected) <= 1e-4


@pytest.mark.parametrize("text", ["qwen2", "phi3"])
def test_internvl_full_forward_parity(text):
    """Image + text forward, 2 rows, 3 tiles, plus a padding tile only our buffer has."""
    hf_cfg, cfg = ref.internvl_pair(text)
    torch_model = ref.randomize_(transformers.InternVLForConditionalGeneration(hf_cfg))
    ours = build_ours(cfg, model_rules(cfg, "native"), torch_model.state_dict())
    ids = ref.internvl_input_ids([2, 1], seq_len=20)
    px = np.random.RandomState(7).randn(3, 3, 56, 56).astype(np.float32)
    with torch.no_grad():
        expected = torch_model(input_ids=torch.tensor(ids, dtype=torch.long),
                               pixel_values=torch.tensor(px)).logits.numpy()
    buffer = np.concatenate([px[:2], np.zeros_like(px[:1]), px[2:]])  # padding tile in between
    flags = np.array([1, 1, 0, 1], np.int32)
    logits = ours(jnp.asarray(ids), jnp.asarray(buffer), jnp.asarray(flags))
    assert rel_err(logits, expected) <= 1e-4

    # bf16 compute, float32 master weights: within 2e-2 of the float32 reference
    bf16 = build_ours(cfg, model_rules(cfg, "native"), torch_model.state_dict(),
                      ComputeConfig(dtype="bfloat16"))
    logits16 = bf16(jnp.asarray(ids), jnp.asarray(buffer), jnp.asarray(flags))
    assert rel_err(logits16, expected) <= 2e-2
