"""Config validation and overrides; logical-axis rules placing a model on 8 fake CPU devices."""

import typing

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from mini_internvl_jax import configlib, load_model_config
from mini_internvl_jax.config import (
    ComputeConfig,
    LLMConfig,
    TemplateName,
    model_config_from_dict,
)
from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.data.config import DataConfig
from mini_internvl_jax.data.templates import TEMPLATES
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.sharding import create_sharded_model, logical_to_spec, make_mesh


def test_presets_load_with_overrides():
    cfg = load_model_config("mini-internvl-2b", ["llm.num_layers=2", "select_layer=-2"])
    assert cfg.llm.num_layers == 2 and cfg.select_layer == -2
    assert cfg.llm.family == "internlm2" and cfg.image_token_id == 92546
    assert cfg.llm.rope_scaling.type == "dynamic" and cfg.llm.rope_scaling.factor == 2.0
    assert cfg.num_image_tokens == 256 and cfg.projector_in_dim == 4096
    four = load_model_config("mini-internvl-4b")
    assert four.llm.head_dim == 96
    assert four.llm.rope_scaling.original_max_position_embeddings == 4096


@pytest.mark.parametrize("overrides,match", [
    (["llm.num_kv_heads=3"], r"llm\.num_kv_heads"),
    (["llm.bogus=1"], r"unknown key.*bogus"),
    (["vision.num_heads=5"], r"vision\.num_heads"),
    (["llm.num_layers=two"], r"llm\.num_layers: expected an integer"),
    (["template=chatml"], r"template: 'chatml' is not one of"),
    (["image_token_id=999999"], r"image_token_id"),
    (["downsample_ratio=0.3"], r"downsample_ratio"),
    (["remat=none"], r"unknown key.*remat"),  # run-time settings are not architecture
    (["noequals"], r"key=value"),
])
def test_bad_config_errors_name_the_field(overrides, match):
    with pytest.raises(ConfigError, match=match):
        load_model_config("tiny-qwen2", overrides)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown model preset 'nope'.*mini-internvl-1b"):
        load_model_config("nope")
    with pytest.raises(ConfigError, match=r"known model presets: \[[^]]*tiny-qwen2'[^]]*\]"):
        load_model_config("stage2")  # a training preset is not a model preset
    with pytest.raises(ConfigError, match="does not exist"):
        load_model_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("llm: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_model_config(bad)


def test_compute_config_choices_are_checked_in_python_and_yaml():
    with pytest.raises(ConfigError, match=r"compute\.remat: 'sometimes' is not one of"):
        ComputeConfig(remat="sometimes")
    with pytest.raises(ConfigError, match=r"compute\.dtype: 'fp8' is not one of"):
        configlib.from_dict(ComputeConfig, {"dtype": "fp8"}, "compute")
    assert ComputeConfig() == ComputeConfig("float32", "float32", "xla", False, "none", True)


def test_template_choices_match_the_chat_templates():
    """The config's TemplateName values are exactly the templates data/templates.py defines."""
    assert set(typing.get_args(TemplateName)) == set(TEMPLATES)
    with pytest.raises(ConfigError, match=r"data\.template: 'chatml' is not one of"):
        configlib.from_dict(DataConfig, {"meta_path": "m.json", "template": "chatml"}, "data")


def test_stored_legacy_compute_keys_are_dropped_with_a_notice(capsys):
    from mini_internvl_jax.convert.orbax_io import model_config_from_json

    data = configlib.to_dict(load_model_config("tiny-qwen2"))
    old = {**data, "dtype": "bfloat16", "param_dtype": "bfloat16", "scan_layers": True,
           "remat": "none", "attention_impl": "xla", "check_image_tokens": False}
    assert model_config_from_json(old, "old/model_config.json") == model_config_from_dict(data)
    out = capsys.readouterr().out
    assert out.count("\n") == 1 and "old/model_config.json" in out and "'remat'" in out
    model_config_from_json(data, "new/model_config.json")
    assert capsys.readouterr().out == ""


def test_longrope_factor_length_is_checked():
    with pytest.raises(ConfigError, match="short_factor.*needs head_dim // 2 = 8"):
        configlib.from_dict(LLMConfig, {
            "family": "phi3", "vocab_size": 10, "hidden_size": 64, "num_layers": 1,
            "num_heads": 4, "num_kv_heads": 4, "intermediate_size": 8,
            "rope_scaling": {"type": "longrope", "short_factor": [1.0, 2.0],
                             "original_max_position_embeddings": 8}}, "llm")


def test_logical_to_spec_drops_axes_that_do_not_divide():
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == \
        P("fsdp", "tensor", None)
    # 1 KV head cannot be split over tensor=2: replicated on that dim
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 1, 16), mesh) == \
        P("fsdp", None, None)
    # batch maps to (data, fsdp); data=1 still divides
    assert logical_to_spec(("batch", "length"), (8, 5), mesh) == P(("data", "fsdp"), None)


@pytest.mark.parametrize("scan", [
    # per-layer parameters placed by the same rules: test_generate's sharded generation (slow)
    pytest.param(False, marks=pytest.mark.slow), True])
def test_model_built_on_8_device_mesh_is_placed_by_the_rules(scan):
    assert jax.device_count() == 8
    cfg = load_model_config("tiny-qwen2")
    mesh = make_mesh(data=1, fsdp=4, tensor=2)
    compute = ComputeConfig(scan_layers=scan)
    model = create_sharded_model(lambda: InternVLModel(cfg, compute, rngs=nnx.Rngs(0)), mesh)
    flat = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    layer = ("llm", "layers", "layers") + (() if scan else (0,))
    lead = (None,) if scan else ()
    expected = {
        ("llm", "embed_tokens"): P("tensor", "fsdp"),                       # vocab, embed
        ("llm", "lm_head"): P("fsdp", "tensor"),                            # embed, vocab
        layer + ("q_proj", "kernel"): P(*lead, "fsdp", "tensor", None),     # embed, heads, hd
        layer + ("k_proj", "kernel"): P(*lead, "fsdp", "tensor", None),     # 2 kv heads / 2
        layer + ("o_proj", "kernel"): P(*lead, "tensor", None, "fsdp"),
        layer + ("gate_proj", "kernel"): P(*lead, "fsdp", "tensor"),
        layer + ("down_proj", "kernel"): P(*lead, "tensor", "fsdp"),
        layer + ("input_norm", "weight"): P(*lead, None),
        ("projector", "fc1", "kernel"): P("fsdp", "tensor"),
    }
    for path, spec in expected.items():
        arr = flat[path][...]
        assert arr.sharding.spec == spec, (path, arr.sharding.spec, spec)
        assert len(arr.sharding.device_set) == 8
    # a sharded parameter really is split: each device holds a 1/8 block of q_proj
    q = flat[layer + ("q_proj", "kernel")][...]
    shard_shape = q.addressable_shards[0].data.shape
    assert np.prod(shard_shape) * 8 == np.prod(q.shape)


def test_sharded_forward_matches_single_device():
    cfg = load_model_config("tiny-qwen2")
    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    sharded = create_sharded_model(lambda: InternVLModel(cfg, rngs=nnx.Rngs(0)), mesh)
    with nnx.use_eager_sharding(False):
        single = InternVLModel(cfg, rngs=nnx.Rngs(0))
    ids = np.random.RandomState(0).randint(10, 500, size=(4, 12)).astype(np.int32)

    @nnx.jit
    def fwd(m, x):
        return m(x)

    with jax.set_mesh(mesh):
        out_sharded = fwd(sharded, ids)
    np.testing.assert_allclose(np.asarray(out_sharded), np.asarray(single(ids)), atol=2e-5)
