"""load_pretrained placement: mesh shardings, stacked/per-layer storage, .bin checkpoints."""

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from mini_internvl_jax.checkpoints.resolve import load_pretrained, load_pretrained_with_info
from mini_internvl_jax.config import ComputeConfig, load_model_config
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.convert.importer import convert_hf_to_orbax
from mini_internvl_jax.convert.params import abstract_model, flat_specs, param_specs
from mini_internvl_jax.sharding import logical_to_spec, make_mesh
from tests.helpers.checkpoints import native_model, read_tensors, write_original


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """An original-layout InternLM2 checkpoint (bf16) and its converted folder."""
    root = tmp_path_factory.mktemp("load")
    model, hf_cfg = native_model("internlm2")
    write_original(root / "hf", model, hf_cfg, "internlm2", dtype=torch.bfloat16)
    convert_hf_to_orbax(root / "hf", root / "flat")
    return root, model


def _params(model) -> dict:
    return {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def test_restores_onto_mesh_shardings(folders):
    """(1, 4, 2) mesh on the 8 fake devices: every parameter on its logical-rule sharding."""
    root, _ = folders
    mesh = make_mesh(1, 4, 2, devices=jax.devices()[:8])
    reference = _params(load_pretrained(root / "flat"))
    for src in (root / "flat", root / "hf"):  # Orbax restore, and in-memory HF conversion
        model = load_pretrained(src, mesh=mesh)
        state = nnx.state(model)
        n_sharded = 0
        for path, var in nnx.to_flat_state(state):
            arr = var[...]
            names = var.get_metadata().get("out_sharding")
            expected = logical_to_spec(names, arr.shape, mesh)
            assert arr.sharding.mesh.shape == mesh.shape, path
            assert arr.sharding.spec == expected, (path, arr.sharding.spec, expected)
            n_sharded += any(s is not None for s in expected)
            np.testing.assert_array_equal(np.asarray(arr), reference[tuple(path)])
        assert n_sharded > 10  # the mesh really splits the big matrices


def test_stacked_and_per_layer_storage_load_either_way(folders):
    root, _ = folders
    convert_hf_to_orbax(root / "hf", root / "scanned", scan_layers=True)
    flat = _params(load_pretrained(root / "flat"))
    bf16 = ComputeConfig(dtype="bfloat16", param_dtype="bfloat16")
    restacked = load_pretrained(root / "flat", bf16.replace(scan_layers=True))
    assert restacked.compute.scan_layers
    unstacked = load_pretrained(root / "scanned", bf16.replace(scan_layers=False))
    for model in (restacked, load_pretrained(root / "scanned")):
        stacked = _params(model)
        q = stacked[("llm", "layers", "layers", "q_proj", "kernel")]
        for i in range(model.cfg.llm.num_layers):
            np.testing.assert_array_equal(q[i], flat[("llm", "layers", "layers", i, "q_proj",
                                                      "kernel")])
    assert _params(unstacked).keys() == flat.keys()
    for k, v in _params(unstacked).items():
        np.testing.assert_array_equal(v, flat[k])
    # a stacked store exports back to the exact source tensors
    export_to_hf(root / "scanned", root / "scanned-back", read_batch_bytes=10_000)
    src, back = read_tensors(root / "hf"), read_tensors(root / "scanned-back")
    assert sorted(src) == sorted(back)
    assert all(src[k].tobytes() == back[k].tobytes() for k in src)


@pytest.mark.parametrize("scan", [False, True])
def test_param_specs_match_the_built_model(scan):
    """The converter's shapes (traced stacked, split on paper) equal the real model's."""
    cfg = load_model_config("tiny-internlm2")
    compute = ComputeConfig(param_dtype="bfloat16", scan_layers=scan)
    assert param_specs(cfg, dtype="bfloat16", scan=scan) == flat_specs(
        abstract_model(cfg, compute)[1])


def test_dtype_choices_on_load(folders):
    root, _ = folders
    model, info = load_pretrained_with_info(root / "flat")  # as stored: bf16, per layer
    assert info.compute == ComputeConfig(dtype="bfloat16", param_dtype="bfloat16")
    assert model.compute == info.compute
    assert model.llm.embed_tokens[...].dtype == jax.numpy.bfloat16
    model = load_pretrained(root / "flat", ComputeConfig(dtype="bfloat16"))
    assert model.llm.embed_tokens[...].dtype == jax.numpy.float32
    assert model.compute.dtype == "bfloat16"


def test_pytorch_bin_checkpoint_converts_like_safetensors(folders, tmp_path):
    root, _ = folders
    from safetensors.torch import load_file

    sd = load_file(str(root / "hf" / "model.safetensors"))
    (tmp_path / "bin").mkdir()
    torch.save(sd, tmp_path / "bin" / "pytorch_model.bin")
    for f in ("config.json", "added_tokens.json"):
        (tmp_path / "bin" / f).write_bytes((root / "hf" / f).read_bytes())
    convert_hf_to_orbax(tmp_path / "bin", tmp_path / "out")
    a, b = _params(load_pretrained(tmp_path / "out")), _params(load_pretrained(root / "flat"))
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype
        np.testing.assert_array_equal(a[k], b[k])
