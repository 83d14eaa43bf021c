"""Ahead-of-time compilation of the training step for TPU topologies on this CPU machine."""

import importlib.util
import math

import numpy as np
import pytest
import yaml
from flax import nnx

from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.train.config import (
    build_model_config,
    load_train_config,
    train_config_from_dict,
)

pytestmark = pytest.mark.skipif(importlib.util.find_spec("libtpu") is None,
                                reason="libtpu is not installed (pip install 'jax[tpu]')")


def _param_bytes_by_hand(cfg) -> int:
    """Bytes of every parameter of the model, from an abstract model built here."""
    mc = build_model_config(cfg)
    with nnx.use_eager_sharding(False):
        state = nnx.state(nnx.eval_shape(
            lambda: InternVLModel(mc, cfg.model_compute, rngs=nnx.Rngs(0))))
    return sum(math.prod(v.shape) * np.dtype(v.dtype).itemsize
               for _, v in nnx.to_flat_state(state))


def test_tiny_step_compiles_for_v5e_2x2_with_fsdp():
    """Qwen3 (InternVL3.5's decoder: q/k norms, explicit head_dim); the two-slice test below
    compiles Qwen2."""
    from mini_internvl_jax.train.aot import compile_for_topology, format_report

    cfg = train_config_from_dict({
        "model": "tiny-qwen3", "batch_size": 4, "seq_len": 64, "max_tiles": 4,
        "synthetic": {"tiles_per_sample": 1},
        "compute": {"attention_impl": "xla", "remat": "auto"},
        "mesh": {"data": 1, "fsdp": -1, "tensor": 1}})
    r = compile_for_topology(cfg, "v5e:2x2")
    # remat auto on a v5e (a known roofline): all five policies compiled, and the tiny step
    # fits without recomputation, which is also its fastest
    assert r["remat"] == "none" and r["remat_choice"].startswith("remat auto -> none (")
    assert r["chips"] == 4 and r["mesh"] == {"data": 1, "fsdp": 4, "tensor": 1}
    assert "v5" in r["device_kind"].lower()
    total = _param_bytes_by_hand(cfg) / 2**30
    # FSDP: each chip holds about a quarter (dims that 4 does not divide stay whole).
    assert total / 4 <= r["trainable_gib"] < total / 2
    assert r["optimizer_gib"] == pytest.approx(2 * r["trainable_gib"], rel=1e-3)  # mu, nu
    assert r["temporaries_gib"] > 0 and r["peak_gib"] >= r["arguments_gib"]
    report = format_report(r)
    assert "per chip" in report and "remat auto -> none" in report
    assert "v5e: " in report and "ms kernel by kernel" in report
    # the roofline: no kernel overlaps another, so their sum bounds the whole step from above
    t = r["roofline"]["v5e"]
    assert t["per_kernel_s"] >= t["global_s"] >= r["hlo_flops_per_chip"] / 197e12 > 0
    # one slice: FSDP gathers and reduce-scatters on ICI, nothing crosses slices
    assert r["ici_collective_bytes"] > 0 and r["dcn_collective_bytes"] == 0


def test_two_slice_step_compiles_from_the_command_line(tmp_path, capsys, monkeypatch):
    """The launch guide's sizing command: data parallel over two v5e:2x2 slices, FSDP inside."""
    from mini_internvl_jax.cli import train as cli
    from mini_internvl_jax.train.aot import compile_for_topology

    reports = []
    real_format = cli.format_report
    monkeypatch.setattr(cli, "format_report", lambda r: reports.append(r) or real_format(r))
    cfg = {"model": "tiny-qwen2", "batch_size": 8, "seq_len": 64, "max_tiles": 8,
           "synthetic": {"tiles_per_sample": 1},
           "compute": {"attention_impl": "xla", "remat": "full"},
           "mesh": {"data": 1, "fsdp": -1, "tensor": 1}}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert cli.main(["--config", str(path), "--aot-tpu", "v5e:2x2", "--num-slices", "2"]) == 0
    out = capsys.readouterr().out
    assert "TPU 2 slices of v5e:2x2 (8 x" in out and "across slices (DCN)" in out
    [r] = reports
    assert r["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1} and r["chips"] == 8
    total = _param_bytes_by_hand(train_config_from_dict(cfg))
    per_chip = r["trainable_gib"] * 2**30
    assert total / 4 <= per_chip < total / 2  # FSDP over the 4 chips of one slice
    # The gradients are summed over the two slices, once per step with one micro-batch: at
    # least each chip's gradient shard in bfloat16 crosses DCN, at most the whole float32
    # gradient (plus a little: metrics, data statistics).
    reduced = r["dcn_bytes_by_op"]["dcn-all_reduce"]
    assert per_chip / 2 <= reduced <= total + 2**16, r
    assert r["ici_collective_bytes"] > per_chip

    # Four micro-batches: each slice accumulates its own float32 gradient and the slices sum it
    # once per step (at most twice the one micro-batch's bfloat16 bytes, plus the embedding's
    # per-micro-batch gathers), not once per micro-batch (4x).
    accum = {**cfg, "batch_size": 32, "optim": {"grad_accum": 4}}
    r4 = compile_for_topology(train_config_from_dict(accum), "v5e:2x2", num_slices=2)
    assert r4["dcn_bytes_by_op"]["dcn-all_reduce"] <= 2 * reduced + 2**12, (r4, r)
    assert r4["dcn_collective_bytes"] < 2.5 * r["dcn_collective_bytes"], (r4, r)


def test_unknown_topology_is_a_clear_error():
    from mini_internvl_jax.train.aot import topology_devices

    with pytest.raises(RuntimeError, match="cannot describe TPU topology 'v99x:1x1'"):
        topology_devices("v99x:1x1")


@pytest.mark.slow  # ~4 min; the tiny and two-slice compiles above run the same code path
def test_w1_step_compiles_for_v5e_2x2_with_fsdp():
    from mini_internvl_jax.train.aot import compile_for_topology

    cfg = load_train_config("stage2", [
        "data=null", "batch_size=4", "max_tiles=24", "synthetic.tiles_per_sample=6",
        "optim.grad_accum=1", "model_overrides={}"])
    r = compile_for_topology(cfg, "v5e:2x2")
    assert r["mesh"]["fsdp"] == 4
    assert r["peak_gib"] < 16.0  # fits a v5e chip's HBM


@pytest.mark.slow  # minutes; the tiny Qwen3 compile above runs the same code path
def test_internvl3_5_1b_step_compiles_for_v5e_2x2():
    """`mivl-train --config stage2 model=internvl3_5-1b data=null --aot-tpu v5e:2x2`."""
    from mini_internvl_jax.train.aot import compile_for_topology

    cfg = load_train_config("stage2", ["model=internvl3_5-1b", "data=null"])
    r = compile_for_topology(cfg, "v5e:2x2")
    assert r["mesh"]["fsdp"] == 4 and r["peak_gib"] > 0
