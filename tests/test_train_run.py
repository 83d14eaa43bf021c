"""The training step and loop on 8 fake CPU devices: sharded == single device, gradient
accumulation == one big batch, two processes == one, exact resume (also after SIGTERM),
restore on fewer devices, stage-1 freezing and non-finite step handling."""

import json
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import portpicker
import pytest
from flax import nnx

from mini_internvl_jax.checkpoints.checkpointer import Checkpointer
from mini_internvl_jax.placement import to_global
from mini_internvl_jax.sharding import make_mesh
from mini_internvl_jax.train import trainer
from mini_internvl_jax.train.batches import SyntheticBatches
from mini_internvl_jax.train.config import train_config_from_dict
from mini_internvl_jax.train.setup import build, build_abstract
from mini_internvl_jax.train.state import abstract_like

BASE = {
    "model": "tiny-qwen2", "batch_size": 8, "seq_len": 32, "max_tiles": 16, "total_steps": 4,
    "synthetic": {"tiles_per_sample": 1, "samples_per_row": 2},
    "compute": {"dtype": "float32", "remat": "none", "scan_layers": True}, "loss_chunk": 8,
    # A large Adam eps keeps the update a smooth function of the gradient, so float32
    # reduction-order noise in near-zero gradients (k_proj biases) is not amplified to +-lr.
    "optim": {"lr": 1e-2, "warmup_steps": 1, "eps": 1e-4},
    "log": {"every": 100, "progress_bar": False, "tensorboard": False},
}
ONE = {"data": 1, "fsdp": 1, "tensor": 1}
CACHE_KEYS = ("jax_compilation_cache_dir", "jax_persistent_cache_min_compile_time_secs",
              "jax_persistent_cache_min_entry_size_bytes")


@pytest.fixture(scope="module", autouse=True)
def compilation_cache(tmp_path_factory):
    """Steps compiled by earlier runs (any xdist worker) come from a persistent cache."""
    root = tmp_path_factory.getbasetemp()
    root = root.parent if root.name.startswith("popen-gw") else root
    old = {k: getattr(jax.config, k) for k in CACHE_KEYS}
    for k, v in zip(CACHE_KEYS, (str(root / "train_jax_cache"), 0, 0), strict=True):
        jax.config.update(k, v)
    yield
    for k, v in old.items():
        jax.config.update(k, v)


def config(**over):
    return train_config_from_dict({**BASE, **over})


def run_one(**over):
    """The reference configuration on a single device."""
    stop_after = over.pop("stop_after", None)
    return trainer.run(config(mesh=ONE, **over), devices=jax.devices()[:1],
                       stop_after=stop_after)


def flat(params) -> dict:
    return {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(params)}


def losses(result):
    return [h["loss"] for h in result.history]


def assert_params_close(got: dict, want: dict, exact=False):
    assert got.keys() == want.keys()
    for k in want:
        if exact:
            np.testing.assert_array_equal(got[k], want[k], err_msg=str(k))
        else:
            np.testing.assert_allclose(got[k], want[k], rtol=2e-5, atol=2e-6, err_msg=str(k))


@pytest.fixture(scope="module")
def single_device():
    """Reference: 4 steps on one device."""
    r = run_one()
    assert len(set(losses(r))) == 4 and all(h["finite"] for h in r.history)  # it trains
    return r


@pytest.mark.parametrize("mesh", [
    # every axis sharded, two micro-batches: each data group accumulates its own gradient and
    # the groups are summed once per step (train/step.py)
    {"data": 2, "fsdp": 2, "tensor": 2},
    # pure data parallel, one micro-batch: XLA's own gradient sum (slow)
    pytest.param({"data": 8, "fsdp": 1, "tensor": 1}, marks=pytest.mark.slow)])
def test_sharded_step_matches_single_device(single_device, mesh, tmp_path):
    accum = 2 if mesh["data"] == 2 else 1
    r = trainer.run(config(mesh=mesh, checkpoint={"dir": str(tmp_path), "every": 2},
                           optim={**BASE["optim"], "grad_accum": accum}))
    assert [h["data_digest"] for h in r.history] == [h["data_digest"]
                                                    for h in single_device.history]
    np.testing.assert_allclose(losses(r), losses(single_device), rtol=2e-6)
    want = flat(r.params())
    assert_params_close(want, flat(single_device.params()))

    # The 8-device checkpoint restores onto a 4-device mesh.
    small = make_mesh(1, 4, 1, jax.devices()[:4])
    s = build_abstract(config(mesh={"data": 1, "fsdp": 4, "tensor": 1}), small)
    target = nnx.merge_state(s.state.params, s.state.frozen)
    ckpt = Checkpointer(str(tmp_path), keep=3, async_save=False)
    restored = ckpt.restore(4, params=abstract_like(
        target, jax.tree.map(lambda x: x.sharding, target)))["params"]
    ckpt.close()
    for _, v in nnx.to_flat_state(restored):
        assert v.get_value().sharding.mesh.devices.size == 4
    assert_params_close(flat(restored), want, exact=True)


def test_gradient_accumulation_equals_one_big_batch(single_device):
    r = run_one(optim={**BASE["optim"], "grad_accum": 2})
    np.testing.assert_allclose(losses(r), losses(single_device), rtol=2e-6)
    assert_params_close(flat(r.params()), flat(single_device.params()))


def test_resume_is_exact_after_a_kill_and_after_sigterm(single_device, tmp_path, monkeypatch):
    ckpt = {"dir": str(tmp_path), "every": 2}
    first = run_one(checkpoint=ckpt, stop_after=2)  # then "killed": nothing saved after step 2
    assert first.stopped == "stop_after"
    real = trainer.make_iterator

    def sigterm_after_3(*a, **k):  # the next run gets SIGTERM while its step 3 is prepared
        it = real(*a, **k)
        original = type(it).__next__

        def next_and_signal(self):
            b = original(self)
            if self.index == 3:
                os.kill(os.getpid(), signal.SIGTERM)
            return b

        monkeypatch.setattr(type(it), "__next__", next_and_signal)
        return it

    monkeypatch.setattr(trainer, "make_iterator", sigterm_after_3)
    second = run_one(checkpoint=ckpt)
    monkeypatch.undo()
    assert second.stopped == "preempted" and [h["step"] for h in second.history] == [3]
    assert Checkpointer(str(tmp_path), keep=3, async_save=False).latest_step() == 3
    third = run_one(checkpoint=ckpt)
    both = first.history + second.history + third.history
    assert [h["step"] for h in both] == [1, 2, 3, 4]
    assert [h["loss"] for h in both] == losses(single_device)  # bitwise
    assert [h["data_digest"] for h in both] == [h["data_digest"] for h in single_device.history]
    assert_params_close(flat(third.params()), flat(single_device.params()), exact=True)


def _batch(cfg, model_cfg, s):
    it = SyntheticBatches(vocab_size=model_cfg.llm.vocab_size,
                          image_token_id=model_cfg.image_token_id,
                          num_image_tokens=model_cfg.num_image_tokens,
                          image_size=model_cfg.vision.image_size, seq_len=cfg.seq_len,
                          batch_size=cfg.batch_size, max_tiles=cfg.max_tiles,
                          tiles_per_sample=1, samples_per_row=2, seed=1)
    return to_global({k: v[None] for k, v in next(it).items()}, s.batch_sh)


def test_stage1_changes_only_the_projector():
    cfg = config(stage=1, mesh=ONE)
    mesh = make_mesh(1, 1, 1, jax.devices()[:1])
    s = build(cfg, mesh)
    assert {p[0] for p, _ in nnx.to_flat_state(s.state.params)} == {"projector"}
    before = flat(nnx.merge_state(s.state.params, s.state.frozen))
    state = s.state
    with jax.set_mesh(mesh):
        for _ in range(2):
            state, m = s.step_fn(state, _batch(cfg, s.model_cfg, s))
    assert bool(m["finite"])
    after = flat(nnx.merge_state(state.params, s.state.frozen))
    for k in before:
        if k[0] == "projector":
            assert not np.array_equal(after[k], before[k]), k
        else:
            np.testing.assert_array_equal(after[k], before[k], err_msg=str(k))


def test_non_finite_steps_are_skipped_then_stop_the_run(tmp_path, monkeypatch):
    real = trainer.make_iterator

    def poisoned(*a, **k):  # batches 3, 4, ... carry NaN pixels
        it = real(*a, **k)
        original = type(it).__next__

        def next_poisoned(self):
            b = original(self)
            if self.index > 2:
                b["pixel_values"] = np.full_like(b["pixel_values"], np.nan)
            return b

        monkeypatch.setattr(type(it), "__next__", next_poisoned)
        return it

    monkeypatch.setattr(trainer, "make_iterator", poisoned)
    r = run_one(max_bad_steps=3, checkpoint={"dir": str(tmp_path / "a"), "every": 2})
    assert [h["finite"] for h in r.history] == [True, True, False, False]
    assert [h["skipped"] for h in r.history] == [0, 0, 1, 2]
    ckpt = Checkpointer(str(tmp_path / "a"), keep=3, async_save=False)
    assert ckpt.latest_step() == 2  # nothing is saved while steps are bad
    target = r.params()
    restored = ckpt.restore(2, params=abstract_like(
        target, jax.tree.map(lambda x: x.sharding, target)))["params"]
    ckpt.close()
    assert_params_close(flat(target), flat(restored), exact=True)  # skipped = untouched

    with pytest.raises(trainer.TrainingDivergedError, match="2 consecutive"):
        run_one(max_bad_steps=2, checkpoint={"dir": str(tmp_path / "b"), "every": 2})
    assert Checkpointer(str(tmp_path / "b"), keep=3, async_save=False).latest_step() == 2


WORKER = textwrap.dedent("""
    import json, sys
    import jax
    import numpy as np
    from flax import nnx
    from jax.experimental import multihost_utils

    port, pid, cfg_json, out = sys.argv[1:]
    jax.config.update("jax_default_matmul_precision", "highest")
    jax.distributed.initialize(coordinator_address=f"127.0.0.1:{port}", num_processes=2,
                               process_id=int(pid), initialization_timeout=120)
    from mini_internvl_jax.train import trainer
    from mini_internvl_jax.train.config import train_config_from_dict

    r = trainer.run(train_config_from_dict(json.loads(cfg_json)), stop_after=3)
    params = {"/".join(map(str, p)): np.asarray(
        multihost_utils.process_allgather(v.get_value(), tiled=True))
        for p, v in nnx.to_flat_state(r.params())}
    if int(pid) == 0:
        np.savez(out, losses=np.array([h["loss"] for h in r.history]), **params)
    multihost_utils.sync_global_devices("done")
    jax.distributed.shutdown()
""")


def test_two_processes_match_one(tmp_path):
    """2 processes x 4 CPU devices (gloo collectives), fsdp=4 x tensor=2, 3 steps."""
    port = portpicker.pick_unused_port()
    out = tmp_path / "out.npz"
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4",
           "JAX_PLATFORMS": "cpu"}
    cfg = json.dumps({**BASE, "mesh": {"data": 1, "fsdp": 4, "tensor": 2}})
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, str(port), str(i), cfg, str(out)],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True) for i in range(2)]
    reference = run_one(stop_after=3)  # meanwhile, in this process
    logs = [p.communicate(timeout=600)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), "\n".join(x[-3000:] for x in logs)
    got = np.load(out)
    np.testing.assert_allclose(got["losses"], losses(reference), rtol=2e-6)
    want = flat(reference.params())
    assert_params_close({k: got["/".join(map(str, k))] for k in want}, want)
