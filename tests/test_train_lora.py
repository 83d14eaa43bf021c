"""LoRA adapters: a fresh adapter changes nothing, a trained one computes x W + b + s x A B
(checked in numpy), and merging for export gives plain Dense layers with the same function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from mini_internvl_jax import ComputeConfig, load_model_config
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.models.layers import Dense
from mini_internvl_jax.models.lora import (
    LoRAConfig,
    LoRADense,
    LoRAKey,
    LoRAParam,
    apply_lora,
    merge_lora,
    with_dropout_keys,
)


@pytest.mark.parametrize("in_shape,out_shape", [((6,), (2, 5)), ((2, 3), (4,))])
def test_lora_dense_matches_numpy(in_shape, out_shape):
    with nnx.use_eager_sharding(False):
        base = Dense(in_shape, out_shape, ("a",) * len(in_shape) + ("b",) * len(out_shape),
                     use_bias=True, rngs=nnx.Rngs(0), dtype=jnp.float32,
                     param_dtype=jnp.float32)
        layer = LoRADense(base, rank=3, scale=2.5, dropout=0.0, rngs=nnx.Rngs(1))
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4,) + in_shape).astype(np.float32)
    w = np.asarray(base.kernel.get_value(), np.float64)
    bias = rng.standard_normal(out_shape)
    layer.bias[...] = jnp.asarray(bias, jnp.float32)
    xf = x.reshape(4, -1).astype(np.float64)
    plain = (xf @ w.reshape(xf.shape[1], -1)).reshape((4,) + out_shape) + bias
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), plain, rtol=1e-5, atol=1e-5)
    b = rng.standard_normal(layer.lora_b.shape) * 0.3
    layer.lora_b[...] = jnp.asarray(b, jnp.float32)
    a = np.asarray(layer.lora_a.get_value(), np.float64).reshape(xf.shape[1], 3)
    want = plain + 2.5 * (xf @ a @ b.reshape(3, -1)).reshape((4,) + out_shape)
    np.testing.assert_allclose(np.asarray(layer(jnp.asarray(x))), want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(layer.merged_kernel()),
                               w + 2.5 * (a @ b.reshape(3, -1)).reshape(w.shape),
                               rtol=1e-5, atol=1e-6)


SCANNED = ComputeConfig(scan_layers=True)

def random_model(make, seed=0):
    """`make()`'s structure with N(0, 0.1) weights from numpy: no per-op XLA compiles."""
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(make))
    rng = np.random.default_rng(seed)
    state = jax.tree.map(lambda s: jnp.asarray(0.1 * rng.standard_normal(s.shape), s.dtype),
                         state)
    return nnx.merge(graphdef, state)


def _forward(model, ids, px, flags):
    graphdef, state = nnx.split(model)
    return np.asarray(jax.jit(lambda s: nnx.merge(graphdef, s)(ids, px, flags))(state))


def test_lora_on_scanned_model_and_merge():
    cfg = load_model_config("tiny-qwen2")
    model = random_model(lambda: InternVLModel(cfg, SCANNED, rngs=nnx.Rngs(0)))
    rng = np.random.default_rng(0)
    ids = rng.integers(6, cfg.llm.vocab_size, (2, 12)).astype(np.int32)
    ids[0, 1:5] = cfg.image_token_id
    px = jnp.asarray(rng.standard_normal((1, 3, 56, 56)), jnp.float32)
    ids, flags = jnp.asarray(ids), jnp.ones((1,), jnp.int32)
    with nnx.use_eager_sharding(False):
        assert apply_lora(model, LoRAConfig(rank=3, alpha=12.0, vision=True),
                          nnx.Rngs(1)) == 11
    for _, node in nnx.iter_graph(model):
        if isinstance(node, LoRADense):
            assert node.lora_a.shape[0] == node.kernel.shape[0] == 2  # one adapter per layer
            node.lora_b[...] = jnp.asarray(rng.standard_normal(node.lora_b.shape) * 0.05,
                                           jnp.float32)
    lora_logits = _forward(model, ids, px, flags)
    assert merge_lora(model) == 11
    assert not any(isinstance(v, LoRAParam) for _, v in nnx.to_flat_state(nnx.state(model)))
    assert all(type(n) is Dense for _, n in nnx.iter_graph(model) if isinstance(n, Dense))
    np.testing.assert_allclose(_forward(model, ids, px, flags), lora_logits, rtol=1e-4,
                               atol=1e-4)


def test_lora_dropout_keys_differ_per_adapter_and_layer():
    cfg = load_model_config("tiny-qwen2")
    model = random_model(lambda: InternVLModel(cfg, SCANNED, rngs=nnx.Rngs(0)))
    with nnx.use_eager_sharding(False):
        apply_lora(model, LoRAConfig(rank=2, dropout=0.5, targets=("q_proj", "v_proj")),
                   nnx.Rngs(1))
    rest = nnx.state(model, LoRAKey)
    keys = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(
        with_dropout_keys(rest, jax.random.key(3)))]
    assert len(keys) == 2 and keys[0].shape[0] == cfg.llm.num_layers
    rows = np.concatenate(keys).reshape(-1, keys[0].shape[-1])
    assert len({r.tobytes() for r in rows}) == len(rows)
    again = [np.asarray(v.get_value()) for _, v in nnx.to_flat_state(
        with_dropout_keys(rest, jax.random.key(3)))]
    for a, b in zip(keys, again, strict=True):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="match no Dense"):
        apply_lora(model, LoRAConfig(rank=2, targets=("wqkv",)), nnx.Rngs(0))
