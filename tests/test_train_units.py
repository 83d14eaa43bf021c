"""Training building blocks against independent references: cross-entropy, optimizer, FLOPs,
configs (TensorBoard: test_train_tensorboard.py)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mini_internvl_jax import ComputeConfig, load_model_config
from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.sharding import make_mesh
from mini_internvl_jax.train import flops, metrics
from mini_internvl_jax.train.config import OptimConfig, load_train_config, train_config_from_dict
from mini_internvl_jax.train.loss import cross_entropy_sums
from mini_internvl_jax.train.optim import decay_mask, make_optimizer, make_schedule
from mini_internvl_jax.train.state import split_params

# ----------------------------------------------------------------------------- cross-entropy

def _problem(b=2, s=11, d=8, v=37, seed=0):
    rng = np.random.default_rng(seed)
    hidden = rng.standard_normal((b, s, d)).astype(np.float32)
    head = rng.standard_normal((d, v)).astype(np.float32)
    labels = rng.integers(0, v, (b, s)).astype(np.int32)
    labels[rng.random((b, s)) < 0.3] = -100
    weights = rng.uniform(0.2, 2.0, (b, s)).astype(np.float32)
    weights[labels == -100] = 0.0
    return hidden, head, labels, weights


def _numpy_ce(hidden, head, labels, weights):
    logits = hidden.astype(np.float64) @ head.astype(np.float64)
    m = logits.max(-1, keepdims=True)
    logp = logits - m - np.log(np.exp(logits - m).sum(-1, keepdims=True))
    keep = labels != -100
    ce = -np.take_along_axis(logp, np.where(keep, labels, 0)[..., None], -1)[..., 0]
    w = np.where(keep, weights, 0.0)
    correct = (logits.argmax(-1) == labels) & keep & (w > 0)
    return (w * ce).sum(), w.sum(), correct.sum()


@pytest.mark.parametrize("chunk", [1, 4, 5, 11, 64])
def test_chunked_cross_entropy_matches_numpy(chunk):
    hidden, head, labels, weights = _problem()
    got = cross_entropy_sums(jnp.asarray(hidden), jnp.asarray(labels), jnp.asarray(weights),
                             jnp.asarray(head), chunk=chunk)
    want = _numpy_ce(hidden, head, labels, weights)
    np.testing.assert_allclose(float(got[0]), want[0], rtol=1e-5)
    np.testing.assert_allclose(float(got[1]), want[1], rtol=1e-6)
    assert float(got[2]) == want[2]


def test_chunked_cross_entropy_gradients_match_dense():
    hidden, head, labels, weights = _problem(s=13)

    def dense(h, w):  # full-logits reference, written independently
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        keep = labels != -100
        tgt = jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(keep, weights, 0.0) * tgt)

    def chunked(h, w):
        return cross_entropy_sums(h, jnp.asarray(labels), jnp.asarray(weights),
                                  w, chunk=4)[0]

    gd = jax.grad(dense, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(head))
    gc = jax.grad(chunked, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(head))
    for a, b in zip(gd, gc, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("sizes", [(2, 2, 2), (1, 4, 1)])
def test_chunked_cross_entropy_gradients_under_a_mesh_match_dense(sizes):
    """Under a mesh the head gradient is summed per batch shard through the chunk loop and
    reduced once after it; it must still be the dense gradient (and tensor-split vocab)."""
    hidden, head, labels, weights = _problem(b=4, s=13, v=38)
    mesh = make_mesh(*sizes, devices=jax.devices()[:8 if sizes[0] == 2 else 4])

    def dense(h, w):
        logp = jax.nn.log_softmax(h @ w, axis=-1)
        keep = labels != -100
        tgt = jnp.take_along_axis(logp, jnp.where(keep, labels, 0)[..., None], -1)[..., 0]
        return -jnp.sum(jnp.where(keep, weights, 0.0) * tgt)

    def chunked(h, w):
        return cross_entropy_sums(h, jnp.asarray(labels), jnp.asarray(weights), w, chunk=4)[0]

    gd = jax.grad(dense, argnums=(0, 1))(jnp.asarray(hidden), jnp.asarray(head))
    batch = NamedSharding(mesh, P(("data", "fsdp")))
    with jax.set_mesh(mesh):
        args = (jax.device_put(hidden, batch),
                jax.device_put(head, NamedSharding(mesh, P("fsdp", "tensor"))))
        gc = jax.jit(jax.grad(chunked, argnums=(0, 1)))(*args)
    for a, b in zip(gd, gc, strict=True):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-5, atol=1e-6)


def test_bfloat16_cross_entropy_gradients_stay_close_to_float32():
    """bf16 operands (logits, and the d(logits) of the in-forward gradient), float32 sums."""
    hidden, head, labels, weights = _problem(s=13, d=32, v=300)

    def ce(h, w, dtype):
        return cross_entropy_sums(h, jnp.asarray(labels), jnp.asarray(weights), w, chunk=4,
                                  dtype=dtype)[0]

    args = (jnp.asarray(hidden), jnp.asarray(head))
    g32 = jax.grad(ce, argnums=(0, 1))(*args, jnp.float32)
    g16 = jax.grad(ce, argnums=(0, 1))(*args, jnp.bfloat16)
    for a, b in zip(g32, g16, strict=True):
        assert b.dtype == jnp.float32  # gradients come back in the inputs' dtype
        rel = np.linalg.norm(np.asarray(b) - np.asarray(a)) / np.linalg.norm(np.asarray(a))
        assert 0 < rel < 2e-2


# ----------------------------------------------------------------------------- optimizer

def test_schedule_is_linear_warmup_then_cosine():
    cfg = OptimConfig(lr=1e-3, warmup_steps=10, min_lr_ratio=0.1)
    sched = make_schedule(cfg, 110)
    for step in (0, 5, 10, 60, 110):
        if step <= 10:
            want = 1e-3 * step / 10
        else:
            frac = (step - 10) / 100
            want = 1e-4 + (1e-3 - 1e-4) * 0.5 * (1 + np.cos(np.pi * frac))
        np.testing.assert_allclose(float(sched(step)), want, rtol=1e-5, atol=1e-12)
    ratio = make_schedule(OptimConfig(lr=1.0, warmup_ratio=0.03), 1000)
    np.testing.assert_allclose(float(ratio(15)), 0.5, rtol=1e-6)  # 30 warmup steps


def _tiny_model():
    """The tiny model's structure with numpy weights (no per-op XLA compiles)."""
    cfg = load_model_config("tiny-qwen2")
    with nnx.use_eager_sharding(False):
        graphdef, state = nnx.split(nnx.eval_shape(lambda: InternVLModel(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)
    state = jax.tree.map(lambda s: jnp.asarray(rng.standard_normal(s.shape), s.dtype), state)
    return nnx.merge(graphdef, state)


def test_adamw_matches_hand_update_and_skips_decay_on_norms_and_biases():
    model = _tiny_model()
    params = nnx.state(model.projector, nnx.Param)
    # the projector alone: its paths lack the `projector.` prefix the default set names, so
    # the mask under test is given (every norm and bias exempt)
    cfg = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.5, clip_norm=None, b1=0.9,
                      b2=0.99, eps=1e-8, no_decay=("norm", r"bias$"))
    tx = make_optimizer(cfg, 100, params)
    grads = jax.tree.map(lambda p: jnp.full(p.shape, 0.25, p.dtype), params)
    updates, _ = tx.update(grads, tx.init(params), params)
    lr = float(make_schedule(cfg, 100)(0))
    for (path, p), (_, u) in zip(nnx.to_flat_state(params), nnx.to_flat_state(updates),
                                 strict=True):
        p, u = np.asarray(p[...]), np.asarray(u[...])
        # step 1: m = 0.1 g, v = 0.01 g^2 -> bias-corrected m/sqrt(v) = sign(g) = 1
        adam = np.full_like(p, 1.0 / (1.0 + 1e-8 / 0.25))
        decays = not ("norm" in path or path[-1] == "bias")
        want = -lr * (adam + (0.5 * p if decays else 0.0))
        np.testing.assert_allclose(u, want, rtol=1e-5, atol=1e-7, err_msg=str(path))


def test_bfloat16_first_moment_is_opt_in_and_close_to_float32():
    model = _tiny_model()
    params = nnx.state(model.projector, nnx.Param)
    rng = np.random.default_rng(1)
    grads = [jax.tree.map(lambda p: jnp.asarray(rng.standard_normal(p.shape), p.dtype), params)
             for _ in range(3)]

    def run(mu_dtype):
        cfg = OptimConfig(lr=0.1, warmup_steps=0, weight_decay=0.0, clip_norm=None,
                          mu_dtype=mu_dtype)
        tx = make_optimizer(cfg, 100, params)
        state = tx.init(params)
        for g in grads:
            upd, state = tx.update(g, state, params)
        return state, np.concatenate([np.ravel(x) for x in jax.tree.leaves(upd)])

    state16, u16 = run("bfloat16")
    state32, u32 = run("params")
    # mu bfloat16, nu float32; by default both follow the float32 parameters
    assert {str(x.dtype) for x in jax.tree.leaves(state16) if x.ndim} == {"bfloat16", "float32"}
    assert {str(x.dtype) for x in jax.tree.leaves(state32) if x.ndim} == {"float32"}
    # the rounding shows, within bfloat16's precision (8 bits: 2^-8 relative per rounding)
    assert not np.array_equal(u16, u32)
    np.testing.assert_allclose(u16, u32, rtol=0.05, atol=1e-3)


def test_decay_mask_patterns():
    model = _tiny_model()
    mask = {tuple(p): bool(v.get_value()) for p, v in nnx.to_flat_state(
        decay_mask(nnx.state(model, nnx.Param), ("norm", r"bias$", "embed_tokens")))}
    assert mask[("llm", "embed_tokens")] is False
    assert mask[("llm", "layers", "layers", 0, "q_proj", "bias")] is False
    assert mask[("llm", "layers", "layers", 0, "input_norm", "weight")] is False
    assert mask[("vision", "encoder", "layers", 1, "norm2", "bias")] is False
    assert mask[("llm", "layers", "layers", 0, "q_proj", "kernel")] is True
    assert mask[("llm", "lm_head")] is True
    assert mask[("vision", "embeddings", "patch_kernel")] is True


@pytest.mark.parametrize("frozen,trained_roots", [
    (frozenset({"vision", "llm"}), {"projector"}),
    (frozenset({"vision"}), {"projector", "llm"}),
    (frozenset(), {"vision", "projector", "llm"}),
])
def test_frozen_parts_carry_no_optimizer_state(frozen, trained_roots):
    model = _tiny_model()
    _, trainable, frozen_state, _ = split_params(model, frozen)
    assert {p[0] for p, _ in nnx.to_flat_state(trainable)} == trained_roots
    assert {p[0] for p, _ in nnx.to_flat_state(frozen_state)} == ({"vision", "projector", "llm"}
                                                                  - trained_roots)
    tx = make_optimizer(OptimConfig(), 10, trainable)
    opt_arrays = [x for x in jax.tree.leaves(tx.init(trainable)) if x.ndim > 0]
    n_trainable = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(trainable))
    assert sum(int(np.prod(x.shape)) for x in opt_arrays) == 2 * n_trainable  # mu and nu only


# ----------------------------------------------------------------------------- FLOPs

def test_w1_flops_by_hand():
    cfg = load_model_config("mini-internvl-1b")
    b, s, tiles = 4, 4096, 24
    n, d, f, L = 1025, 1024, 4096, 24
    vit = tiles * (2 * 1024 * 588 * d + L * (2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d))
    h = 896
    proj = tiles * 256 * 2 * (4096 * h + h * h)
    layer = 2 * (896 * 896 + 2 * 896 * 128 + 896 * 896 + 3 * 896 * 4864) + 2 * s * 896
    llm = b * s * (24 * layer + 2 * 896 * 151655)
    assert flops.step_flops(cfg, batch=b, seq_len=s, tiles=tiles) == pytest.approx(
        3 * (vit + proj + llm), rel=1e-12)
    # stage 1: ViT forward only; projector forward + both gradients; LLM forward + input grads
    stage1 = flops.step_flops(cfg, batch=b, seq_len=s, tiles=tiles,
                              trainable=frozenset({"projector"}))
    assert stage1 == pytest.approx(vit + 3 * proj + 2 * llm, rel=1e-12)


def test_peak_table_and_mfu():
    assert metrics.peak_tflops("TPU v5 lite") == 197.0
    assert metrics.peak_tflops("TPU v5p") == 459.0
    assert metrics.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert metrics.peak_tflops("cpu") is None
    assert metrics.mfu(989.4e12 * 0.5, 1.0, 1, 989.4) == pytest.approx(0.5)


# ----------------------------------------------------------------------------- configs

@pytest.mark.parametrize("name,model", [(stage, f"mini-internvl-{size}")
                                        for stage in ("stage1", "stage2")
                                        for size in ("1b", "2b", "4b")]
                         + [("lora", None), ("demo", None)])
def test_presets_load(name, model):
    over = ["tokenizer=tok"] + ([f"model={model}"] if model else [])
    cfg = load_train_config(name, over)
    assert cfg.model == (model or cfg.model)
    assert cfg.batch_size % cfg.optim.grad_accum == 0
    assert (cfg.frozen_components == {"vision", "llm"}) == (cfg.stage == 1)
    assert not cfg.model_compute.check_image_tokens  # the pipeline checks on the host


def test_train_presets_are_their_own_kind_and_compute_merges_onto_defaults():
    with pytest.raises(ConfigError, match=r"unknown training preset 'tiny-qwen2'.*'demo', "
                                          r"'lora', 'mpo', 'mpo_demo', 'stage1', 'stage2'\]"):
        load_train_config("tiny-qwen2")
    cfg = train_config_from_dict({"compute": {"remat": "none"}})
    default = train_config_from_dict({}).compute
    assert default.dtype == "bfloat16" and default.scan_layers and default.remat == "full"
    assert cfg.compute == default.replace(remat="none")
    with pytest.raises(ConfigError, match=r"compute\.remat: 'sometimes' is not one of"):
        train_config_from_dict({"compute": {"remat": "sometimes"}})
    with pytest.raises(ConfigError, match=r"unknown key.*'remat'"):
        train_config_from_dict({"remat": "none"})  # the old top-level key


@pytest.mark.parametrize("data,match", [
    ({"optim": {"lr": -1.0}}, "optim.lr"),
    ({"batch_size": 6, "optim": {"grad_accum": 4}}, "grad_accum"),
    ({"stage": 1, "lora": {"rank": 8}}, "lora.rank"),
    ({"stage": 3}, "stage"),
    ({"optim": {"learning_rate": 1.0}}, "unknown key"),
    ({"data": {"meta_path": "m.json"}}, "tokenizer"),
])
def test_bad_train_configs_name_the_field(data, match):
    with pytest.raises(ConfigError, match=match):
        train_config_from_dict(data)


def test_old_run_metadata_still_reads():
    """A run saved before ComputeConfig kept dtype/remat/... at the top of its train config."""
    from mini_internvl_jax.checkpoints.run import upgrade_train_config_dict

    old = {"model": "tiny-qwen2", "dtype": "float32", "param_dtype": "float32",
           "remat": "none", "attention_impl": "xla", "scan_layers": False}
    cfg = train_config_from_dict(upgrade_train_config_dict(old))
    assert cfg.compute == ComputeConfig(dtype="float32", param_dtype="float32", remat="none",
                                        attention_impl="xla", scan_layers=False)
    assert upgrade_train_config_dict({"model": "x"}) == {"model": "x"}
