"""init_from: a converted folder, a Hugging Face folder and an earlier run's checkpoint all
initialise the base weights exactly (LoRA adapters start fresh); a LoRA run's checkpoint is
merged for init_from and for export to a converted folder."""

import json

import jax
import numpy as np
from flax import nnx

from mini_internvl_jax.checkpoints.checkpointer import Checkpointer, run_meta
from mini_internvl_jax.checkpoints.export import export_checkpoint
from mini_internvl_jax.checkpoints.resolve import load_pretrained, open_source
from mini_internvl_jax.config import ComputeConfig
from mini_internvl_jax.convert.importer import convert_hf_to_orbax
from mini_internvl_jax.models.lora import LoRAParam
from mini_internvl_jax.sharding import make_mesh
from mini_internvl_jax.train.config import train_config_from_dict
from mini_internvl_jax.train.init_from import load_initial_params, model_config
from mini_internvl_jax.train.setup import build
from tests.helpers.checkpoints import native_model, write_original

BASE = {"batch_size": 2, "seq_len": 32, "max_tiles": 2, "total_steps": 4,
        "synthetic": {"tiles_per_sample": 1},
        "compute": {"dtype": "float32", "remat": "none", "scan_layers": True},
        "lora": {"rank": 2}, "mesh": {"data": 1, "fsdp": 1, "tensor": 1}}
SCANNED = ComputeConfig(scan_layers=True)


def _build(init_from):
    cfg = train_config_from_dict({**BASE, "init_from": str(init_from)})
    mesh = make_mesh(1, 1, 1, jax.devices()[:1])
    s = build(cfg, mesh, model_config(cfg),
              init_params=lambda m: load_initial_params(m, cfg, mesh))
    return s, {tuple(p): v for p, v in nnx.to_flat_state(nnx.merge_state(s.state.params,
                                                                          s.state.frozen))}


def test_init_from_converted_hf_and_lora_checkpoint_then_export(tmp_path):
    model, hf_cfg = native_model("qwen2")
    write_original(tmp_path / "hf", model, hf_cfg, "qwen2")
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "converted")
    want = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(
        nnx.state(load_pretrained(tmp_path / "converted", SCANNED), nnx.Param))}

    for source in ("converted", "hf"):
        s, got = _build(tmp_path / source)
        assert s.model_cfg.llm.vocab_size == want[("llm", "embed_tokens")].shape[0]
        base = {k: v for k, v in got.items() if not isinstance(v, LoRAParam)}
        assert base.keys() == want.keys()
        for k, v in base.items():
            np.testing.assert_array_equal(np.asarray(v.get_value()), want[k], err_msg=str(k))
        lora_b = [np.asarray(v.get_value()) for k, v in got.items() if k[-1] == "lora_b"]
        assert lora_b and all(not b.any() for b in lora_b)  # fresh adapters

    # An earlier LoRA run's checkpoint (weights and adapters perturbed): the new run starts
    # from W + scale * A @ B, merged here in numpy.
    cfg = train_config_from_dict({**BASE, "init_from": str(tmp_path / "converted")})
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda x: x + rng.standard_normal(x.shape).astype(x.dtype) * 0.1,
                          nnx.merge_state(s.state.params, s.state.frozen))
    ckpt = Checkpointer(str(tmp_path / "run"), keep=1, async_save=False)
    ckpt.save(3, params=params, train={"step": s.state.step}, iterator=None,
              meta=run_meta(cfg, s.model_cfg, 3))
    ckpt.close()
    saved = {tuple(p): np.asarray(v.get_value(), np.float64)
             for p, v in nnx.to_flat_state(params)}
    expected = {}
    for k, v in saved.items():
        if k[-1] == "kernel" and k[:-1] + ("lora_a",) in saved:
            a, b = saved[k[:-1] + ("lora_a",)], saved[k[:-1] + ("lora_b",)]
            delta = np.stack([a[i].reshape(-1, 2) @ b[i].reshape(2, -1) for i in range(len(a))])
            v = v + cfg.lora.scale * delta.reshape(v.shape)
        if k[-1] not in ("lora_a", "lora_b"):
            expected[k] = v
    _, again = _build(tmp_path / "run")
    base = {k: v for k, v in again.items() if not isinstance(v, LoRAParam)}
    assert base.keys() == expected.keys()
    for k, v in base.items():
        np.testing.assert_allclose(np.asarray(v.get_value()), expected[k], rtol=1e-5, atol=1e-6,
                                   err_msg=str(k))

    kinds = {name: open_source(tmp_path / name).kind for name in ("run", "converted", "hf")}
    assert kinds == {"run": "training_run", "converted": "converted", "hf": "hf"}
    export_checkpoint(str(tmp_path / "run"), str(tmp_path / "exported"))
    stored = json.loads((tmp_path / "exported" / "model_config.json").read_text())
    assert "scan_layers" not in stored and "remat" not in stored  # architecture only
    exported = load_pretrained(tmp_path / "exported", SCANNED)
    got = {tuple(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(
        nnx.state(exported, nnx.Param))}
    assert got.keys() == expected.keys()
    for k, v in got.items():
        np.testing.assert_allclose(v, expected[k], rtol=1e-5, atol=1e-6, err_msg=str(k))
