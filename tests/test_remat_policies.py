"""Remat policies: what each keeps, and that the ViT and the LLM can run different ones.

The policies must change what is recomputed, never a number: the five recorded float32 losses
(test_step_numerics) cover the tiny model under them; here, a layer with the Pallas attention
kernel (the tiny model's head size runs the dense path) shows that the kernel's residuals are
kept, so its forward runs once, and that the gradients equal those without remat.
"""

import importlib.util
import os
import re
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType

from mini_internvl_jax.config import ComputeConfig
from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.kernels import AttentionMask, attention
from mini_internvl_jax.models.stack import CHECKPOINT_POLICIES

B, S, H, D = 1, 128, 2, 64


def _layer(w, x):
    """Projections (dots), the flash kernel (a Pallas call, no dot), an output projection."""
    q, k, v = (jnp.tanh(x @ w[i]).reshape(B, S, H, D) for i in range(3))
    o = attention(q, k, v, AttentionMask(causal=True), impl="pallas")
    return jnp.sum(jnp.sin(o.reshape(B, S, H * D) @ w[3]))


def _loss(policy):
    if policy == "none":
        return _layer
    return jax.checkpoint(_layer, policy=CHECKPOINT_POLICIES[policy])


def _inputs():
    rng = np.random.default_rng(0)
    w = jnp.asarray(0.1 * rng.standard_normal((4, H * D, H * D)), jnp.float32)
    x = jnp.asarray(rng.standard_normal((B, S, H * D)), jnp.float32)
    return w, x


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="no TPU compiler")
def test_policies_keep_the_attention_kernels_results():
    """Compiled for v5e (the Mosaic kernel): under `full` the backward runs the flash forward
    kernel again (inside the rematerialised computation); the policies that keep its named
    residuals do not, also when XLA is free to drop dead code."""
    from jax.experimental import topologies

    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    devices = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu").devices
    mesh = jax.make_mesh((4,), ("fsdp",), devices=devices, axis_types=(AxisType.Auto,))
    w = jax.ShapeDtypeStruct((4, H * D, H * D), jnp.bfloat16)
    x = jax.ShapeDtypeStruct((B, S, H * D), jnp.bfloat16)
    again = {}
    with jax.set_mesh(mesh):
        for policy in CHECKPOINT_POLICIES:
            hlo = jax.jit(jax.grad(_loss(policy))).lower(w, x).compile().as_text()
            assert re.search(r"custom_call_target=\"tpu_custom_call\".*flash_fwd", hlo)
            again[policy] = bool(re.search(r"rematted_computation[^\"]*flash_fwd", hlo))
    assert again == {"none": False, "save_dots": False, "save_attention": False, "full": True}


def test_policies_change_no_gradient():
    w, x = _inputs()
    ref = jax.jit(jax.grad(_loss("none")))(w, x)
    for policy in ("save_dots", "save_attention", "full"):
        np.testing.assert_allclose(jax.jit(jax.grad(_loss(policy)))(w, x), ref, rtol=1e-6,
                                   atol=1e-7, err_msg=policy)


def _checkpoints_per_part(compute: ComputeConfig) -> tuple[int, int]:
    """(remat regions traced in the ViT, in the LLM) of the tiny model's forward."""
    from flax import nnx

    from mini_internvl_jax.config import load_model_config
    from mini_internvl_jax.models.internvl import InternVLModel

    cfg = load_model_config("tiny-qwen2")
    with nnx.use_eager_sharding(False):
        model = InternVLModel(cfg, compute, rngs=nnx.Rngs(0))
    pixels = jnp.zeros((1, 3, cfg.vision.image_size, cfg.vision.image_size), jnp.float32)
    ids = jnp.ones((1, 8), jnp.int32)

    def count(fn, *args):
        return len(re.findall(r"\b(?:remat2|checkpoint)\[", str(jax.make_jaxpr(fn)(*args))))

    vit = count(lambda p: model.image_features(p), pixels)
    llm = count(lambda i: model.hidden_states(i).hidden, ids)
    return vit, llm


def test_the_vision_tower_takes_its_own_policy():
    base = ComputeConfig(scan_layers=True, remat="full")
    assert _checkpoints_per_part(base) == (1, 1)
    assert _checkpoints_per_part(base.replace(remat_vision="none")) == (0, 1)
    assert _checkpoints_per_part(base.replace(remat="none", remat_vision="save_dots")) == (1, 0)
    for bad in ({"remat": "auto", "remat_vision": "full"}, {"remat_vision": "auto"}):
        with pytest.raises(ConfigError, match="compute.remat_vision: auto is set by"):
            ComputeConfig(**bad)


class _Compiled:
    """What choose_remat reads of a compiled step: its memory analysis and its HLO."""

    def __init__(self, peak: int, hlo: str):
        self.peak, self.hlo = peak, hlo

    def memory_analysis(self):
        return types.SimpleNamespace(argument_size_in_bytes=self.peak, output_size_in_bytes=0,
                                     alias_size_in_bytes=0, temp_size_in_bytes=0,
                                     generated_code_size_in_bytes=0)

    def as_text(self):
        return self.hlo


def _copy_step(n: int) -> str:
    """A module whose one kernel copies n float32 values: 8n HBM bytes, 8n / 819e9 s on v5e."""
    return f"""
HloModule m

ENTRY %main (x: f32[{n}]) -> f32[{n}] {{
  %x = f32[{n}]{{0}} parameter(0)
  ROOT %c = f32[{n}]{{0}} copy(%x)
}}
"""


@pytest.mark.parametrize("kind, expect", [("TPU v5 lite", "save_dots"), ("cpu", "none")])
def test_remat_auto_ranks_the_policies_that_fit_by_their_roofline(monkeypatch, kind, expect):
    """Per policy a made-up compiled step (peak GiB, bytes moved). On a chip with a known
    roofline the fitting policy that moves the fewest bytes wins, even against one with less
    recomputation (`none`); elsewhere the first that fits."""
    from mini_internvl_jax.train import aot

    steps = {"none": (10, 3_000_000), "save_dots": (12, 1_000_000),
             "save_attention (vision save_dots)": (13, 500_000),
             "save_attention": (9, 2_000_000), "full": (5, 2_500_000)}
    gib = 2**30

    def compile_step(cfg, mesh, model_cfg):
        peak, n = steps[aot.remat_label(cfg.compute.remat, cfg.compute.remat_vision)]
        return "setup", "batch", _Compiled(peak * gib, _copy_step(n))

    monkeypatch.setattr(aot, "_compile_step", compile_step)
    device = types.SimpleNamespace(device_kind=kind)
    mesh = types.SimpleNamespace(devices=np.array([device], dtype=object))
    from mini_internvl_jax.train.config import train_config_from_dict

    cfg = train_config_from_dict({"model": "tiny-qwen2", "compute": {"remat": "auto"}})
    chosen, *_, tried = aot.choose_remat(cfg, mesh, model_cfg=object(), budget=12.5 * gib)
    assert aot.remat_label(chosen.compute.remat, chosen.compute.remat_vision) == expect
    if kind == "cpu":
        assert [p for p, *_ in tried] == ["none"] and tried[0][2] is None
        return
    assert [(p, b / gib) for p, b, _ in tried] == [(p, b) for p, (b, _) in steps.items()]
    bw = 819e9
    assert [t for *_, t in tried] == pytest.approx(
        [8 * 3e6 / bw, 8 * 1e6 / bw, None, 8 * 2e6 / bw, 8 * 2.5e6 / bw])
    line = aot.format_choice(chosen, tried, 12.5 * gib)
    assert line.startswith("remat auto -> save_dots (compiled peak per device, per-kernel "
                           "roofline: none 10.00 GiB 0.0 ms, save_dots 12.00 GiB 0.0 ms, ")
