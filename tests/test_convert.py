"""HF PyTorch <-> Orbax conversion: logits parity in both layouts and bit-exact round trips."""

import json
import logging

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers

from mini_internvl_jax import load_pretrained
from mini_internvl_jax.checkpoints.resolve import load_pretrained_with_info
from mini_internvl_jax.config import ComputeConfig
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.convert.importer import convert_hf_to_orbax, open_hf
from mini_internvl_jax.convert.orbax_io import params_metadata
from tests.helpers import hf_reference as ref
from tests.helpers.checkpoints import (
    TEMPLATE,
    inputs,
    native_model,
    read_tensors,
    rel_err,
    torch_logits,
    write_original,
)

FAMILIES = ["qwen2", "internlm2", "phi3"]


@pytest.fixture(scope="module")
def models():
    """One tiny random torch model per family and its logits on the shared image inputs."""
    ids, px = inputs()
    out = {}
    for family in FAMILIES:
        model, hf_cfg = native_model(family)
        out[family] = (model, hf_cfg, torch_logits(model, ids, px))
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_original_layout_converts_to_matching_logits(family, models, tmp_path):
    """Original (remote-code) names, fused ViT qkv, InternLM2 wqkv, Phi-3 fused weights."""
    model, hf_cfg, expected = models[family]
    shards = 2 if family == "qwen2" else 1   # also reads a sharded index
    write_original(tmp_path / "hf", model, hf_cfg, family, shards=shards)
    stats = convert_hf_to_orbax(tmp_path / "hf", tmp_path / "out")
    assert stats.tensors == len(read_tensors(tmp_path / "hf"))
    assert stats.parameters == sum(p.numel() for p in model.parameters())

    ours, info = load_pretrained_with_info(tmp_path / "out")
    assert info.kind == "converted" and info.layout == "original"
    assert info.template == TEMPLATE[family] and info.image_token_id == ref.IMAGE_TOKEN
    assert info.tokenizer_dir is None  # no tokenizer model files in the tiny folder
    assert ours.cfg.llm.family == (family if family != "internlm2" else "internlm2")
    conv = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert conv["image_token_source"] == "added_tokens.json"
    assert conv["template_source"] == "config.json"
    assert (tmp_path / "out" / "added_tokens.json").is_file()

    ids, px = inputs()
    err = rel_err(ours(jnp.asarray(ids), jnp.asarray(px)), expected)
    assert err <= 1e-4, f"{family}: relative error {err}"


def test_native_layout_loads_in_memory_with_matching_logits(models, tmp_path):
    """save_pretrained output (transformers' saved names) straight into load_pretrained."""
    model, _, expected = models["qwen2"]
    model.save_pretrained(tmp_path / "hf")
    ours, info = load_pretrained_with_info(tmp_path / "hf")
    assert info.kind == "hf" and info.layout == "native"
    assert info.template == "Hermes-2"  # family default: native configs carry no template
    ids, px = inputs()
    assert rel_err(ours(jnp.asarray(ids), jnp.asarray(px)), expected) <= 1e-4


def _assert_same_tensors(src: dict, out: dict):
    assert sorted(src) == sorted(out)
    for name, a in src.items():
        b = out[name]
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), f"{name} differs"


@pytest.mark.parametrize("family,store", [("qwen2", "float32"), ("internlm2", "auto"),
                                          ("phi3", "auto")])
def test_original_round_trip_is_bit_exact(family, store, models, tmp_path):
    """bf16 HF -> Orbax (bf16, or float32 storage) -> HF: same names, shapes, dtypes, bytes."""
    model, hf_cfg, _ = models[family]
    write_original(tmp_path / "hf", model, hf_cfg, family, dtype=torch.bfloat16)
    (tmp_path / "hf" / "tokenization_internlm2.py").write_text("# remote code stand-in\n")
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "orbax", dtype=store)
    stored = json.loads((tmp_path / "orbax" / "model_config.json").read_text())
    assert not {"dtype", "param_dtype", "scan_layers", "remat"} & set(stored)  # architecture only
    dtypes = {d.name for _, d in params_metadata(tmp_path / "orbax" / "params").values()}
    assert dtypes == {"float32" if store == "float32" else "bfloat16"}

    max_shard = "20KB" if family == "qwen2" else "5GB"
    export_to_hf(tmp_path / "orbax", tmp_path / "back", max_shard_size=max_shard,
                 read_batch_bytes=30_000)  # many partial reads
    src, back = read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "back")
    _assert_same_tensors(src, back)
    files = sorted(p.name for p in (tmp_path / "back").glob("*.safetensors"))
    if family == "qwen2":
        assert len(files) > 1
        index = json.loads((tmp_path / "back" / "model.safetensors.index.json").read_text())
        assert sorted(index["weight_map"]) == sorted(src)
        assert set(index["weight_map"].values()) == set(files)
    else:
        assert files == ["model.safetensors"]
    for f in ("added_tokens.json", "generation_config.json", "tokenization_internlm2.py"):
        assert (tmp_path / "back" / f).read_bytes() == (tmp_path / "hf" / f).read_bytes()

    # the exported config reads back to the same model, and keeps the keys we do not model
    cfg_src = open_hf(tmp_path / "hf").info.config
    cfg_back = open_hf(tmp_path / "back").info.config
    assert cfg_back.replace(name="x") == cfg_src.replace(name="x")
    exported = json.loads((tmp_path / "back" / "config.json").read_text())
    assert exported["model_type"] == "internvl_chat"
    assert exported["architectures"] == ["InternVLChatModel"]
    assert exported["max_dynamic_patch"] == 12 and exported["use_thumbnail"] is True
    assert exported["torch_dtype"] == "bfloat16"


def test_original_export_config_is_what_internvl_reads(models, tmp_path):
    """InternVLChatConfig picks the LLM config class by llm_config.architectures[0]."""
    for family in ("qwen2", "phi3"):
        model, hf_cfg, _ = models[family]
        write_original(tmp_path / family, model, hf_cfg, family)
        convert_hf_to_orbax(tmp_path / family, tmp_path / f"{family}-orbax")
        export_to_hf(tmp_path / f"{family}-orbax", tmp_path / f"{family}-back")
        exported = json.loads((tmp_path / f"{family}-back" / "config.json").read_text())
        llm, t = exported["llm_config"], hf_cfg.text_config
        assert exported["vision_config"]["image_size"] == 56
        assert exported["force_image_size"] == 56 and exported["ps_version"] == "v2"
        assert exported["template"] == TEMPLATE[family]
        if family == "qwen2":  # transformers' own Qwen2Config(**llm_config)
            assert llm["architectures"] == ["Qwen2ForCausalLM"]
            built = transformers.Qwen2Config(**llm)
            for key in ("vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                        "num_key_value_heads", "intermediate_size", "max_position_embeddings"):
                assert getattr(built, key) == getattr(t, key), key
            assert built.rope_parameters["rope_theta"] == t.rope_parameters["rope_theta"]
        else:  # InternVL vendors a Phi3Config that accepts exactly {type: su|yarn, factors}
            assert llm["architectures"] == ["Phi3ForCausalLM"]
            assert set(llm["rope_scaling"]) == {"type", "short_factor", "long_factor"}
            assert llm["rope_scaling"]["type"] == "su"
            assert llm["rope_scaling"]["short_factor"] == t.rope_parameters["short_factor"]
            assert llm["rope_scaling"]["long_factor"] == t.rope_parameters["long_factor"]
            assert llm["original_max_position_embeddings"] == \
                t.rope_parameters["original_max_position_embeddings"]
            assert llm["max_position_embeddings"] == t.max_position_embeddings


@pytest.mark.parametrize("family", FAMILIES)
def test_native_export_loads_in_transformers(family, models, tmp_path, caplog):
    """native -> Orbax -> native is bit-exact; original InternLM2 -> native unpacks wqkv."""
    model, hf_cfg, expected = models[family]
    if family == "internlm2":
        write_original(tmp_path / "hf", model, hf_cfg, family)
    else:
        model.save_pretrained(tmp_path / "hf")
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "orbax")
    with caplog.at_level(logging.WARNING):
        export_to_hf(tmp_path / "orbax", tmp_path / "back", layout="native")
    assert ("Phi-3" in caplog.text) == (family == "phi3")
    if family != "internlm2":
        _assert_same_tensors(read_tensors(tmp_path / "hf"), read_tensors(tmp_path / "back"))
    reloaded = transformers.InternVLForConditionalGeneration.from_pretrained(
        tmp_path / "back", attn_implementation="eager").eval()
    ids, px = inputs()
    np.testing.assert_allclose(torch_logits(reloaded, ids, px), expected, rtol=0, atol=1e-5)
    if family == "internlm2":
        cfg = json.loads((tmp_path / "back" / "config.json").read_text())
        assert cfg["text_config"]["model_type"] == "llama"
        assert cfg["text_config"]["rope_parameters"]["rope_type"] == "dynamic"


def test_top_level_load_pretrained_delegates(models, tmp_path):
    model, hf_cfg, _ = models["phi3"]
    write_original(tmp_path / "hf", model, hf_cfg, "phi3", dtype=torch.bfloat16)
    convert_hf_to_orbax(tmp_path / "hf", tmp_path / "out")
    m = load_pretrained(tmp_path / "out", ComputeConfig())
    kernel = m.llm.layers.layers[0].q_proj.kernel[...]
    assert kernel.dtype == jnp.float32 and m.compute.param_dtype == "float32"
    # bf16 -> float32 is exact: the first q head of layer 0 equals the torch rows
    qkv = model.model.language_model.layers[0].self_attn.qkv_proj.weight.detach()
    q_rows = qkv[:16].to(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(np.asarray(kernel)[:, 0, :].T, q_rows)
