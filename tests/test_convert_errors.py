"""Every conversion error names the tensor or file, and leaves no output behind."""

import dataclasses
import json
import os

import pytest
import torch

from mini_internvl_jax import fileio
from mini_internvl_jax.cli import convert as cli
from mini_internvl_jax.config import load_model_config
from mini_internvl_jax.convert.errors import (
    CheckpointMismatchError,
    CheckpointReadError,
    ConversionError,
    UnknownArchitectureError,
)
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.convert.hf_config import hf_config_from_model
from mini_internvl_jax.convert.importer import convert_hf_to_orbax
from mini_internvl_jax.convert.mapping import LAYOUTS
from tests.helpers.checkpoints import (
    leftovers,
    native_model,
    read_tensors,
    save_state,
    write_original,
)
from tests.helpers.limited_disk import limited_disk


@pytest.fixture(scope="module")
def source():
    model, hf_cfg = native_model("qwen2")
    return model, hf_cfg


def _folder(tmp_path, source, edit=None, config_edit=None):
    """An original-layout qwen2 folder, with its state dict / config.json edited."""
    model, hf_cfg = source
    sd = write_original(tmp_path / "hf", model, hf_cfg, "qwen2")
    if edit is not None:
        edit(sd)
        (tmp_path / "hf" / "model.safetensors").unlink()
        save_state(tmp_path / "hf", sd)
    if config_edit is not None:
        cfg = json.loads((tmp_path / "hf" / "config.json").read_text())
        config_edit(cfg)
        (tmp_path / "hf" / "config.json").write_text(json.dumps(cfg))
    return tmp_path / "hf"


def _fails(tmp_path, hf, error, *patterns, **kw):
    out = tmp_path / "out"
    with pytest.raises(error) as e:
        convert_hf_to_orbax(hf, out, **kw)
    for p in patterns:
        assert p in str(e.value), str(e.value)
    assert not out.exists()
    assert leftovers(tmp_path) == []
    return str(e.value)


def test_missing_tensor(tmp_path, source):
    hf = _folder(tmp_path, source, edit=lambda sd: sd.pop("mlp1.3.bias"))
    _fails(tmp_path, hf, CheckpointMismatchError, "missing 1 tensor", "'mlp1.3.bias'")


def test_wrong_shape_names_expected_and_found(tmp_path, source):
    def edit(sd):
        sd["mlp1.1.weight"] = torch.zeros(64, 100)

    hf = _folder(tmp_path, source, edit=edit)
    _fails(tmp_path, hf, CheckpointMismatchError, "'mlp1.1.weight'", "(64, 100)",
           "expected (64, 128)")


def test_integer_tensor_is_refused_not_cast(tmp_path, source):
    def edit(sd):
        name = sorted(n for n in sd if n.endswith("mlp.down_proj.weight"))[0]
        sd[name] = sd[name].to(torch.int32)
        edit.name = name

    hf = _folder(tmp_path, source, edit=edit)
    _fails(tmp_path, hf, CheckpointMismatchError, f"{edit.name} (int32)", "hold integers")


def test_unexpected_tensor_strict_and_not(tmp_path, source, capsys):
    def edit(sd):
        sd["language_model.model.extra_adapter.weight"] = torch.zeros(3)
        sd["language_model.model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.zeros(8)

    hf = _folder(tmp_path, source, edit=edit)
    msg = _fails(tmp_path, hf, CheckpointMismatchError, "1 unexpected tensor",
                 "'language_model.model.extra_adapter.weight'", "--no-strict")
    assert "inv_freq" not in msg  # recomputed buffers never count as unexpected
    code = cli.main(["--from-hf", str(hf), "--to", str(tmp_path / "out"), "--no-strict",
                     "--quiet"])
    assert code == 0
    captured = capsys.readouterr()
    assert "ignored unexpected tensor 'language_model.model.extra_adapter.weight'" in \
        captured.err
    assert "converted" in captured.out and "parameters" in captured.out
    conv = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert "language_model.model.extra_adapter.weight" in conv["ignored_tensors"]


@pytest.mark.parametrize("edit,patterns", [
    (lambda c: c["llm_config"].update(architectures=["GPT2LMHeadModel"]),
     ["llm_config.architectures[0] is 'GPT2LMHeadModel'", "Qwen2ForCausalLM"]),
    (lambda c: [c.pop("llm_config"), c.update(model_type="bert", architectures=["BertModel"])],
     ["unknown architecture", "'bert'", "internvl_chat", "InternVLForConditionalGeneration"]),
    (lambda c: c["llm_config"].update(rope_scaling={"type": "yarn", "factor": 4.0}),
     ["rope scaling type 'yarn' is not supported"]),
    (lambda c: c.update(template="vicuna_v1.1"),
     ["chat template 'vicuna_v1.1' is not supported", "template=NAME"]),
    # released-config fields this project does not implement, injected one at a time
    (lambda c: c.update(rope_pos_id_version="v2pe_fix"),
     ["rope_pos_id_version is 'v2pe_fix'", "not implemented"]),
    (lambda c: c["llm_config"].update(use_sliding_window=True),
     ["llm_config.use_sliding_window is True", "not implemented"]),
    (lambda c: c["llm_config"].update(num_experts=8),
     ["llm_config.num_experts is 8", "not implemented"]),
    (lambda c: c["llm_config"].update(layer_types=["full_attention", "sliding_attention"]),
     ["llm_config.layer_types has ['sliding_attention']"]),
    (lambda c: c.update(system_message="You are a pirate."),
     ["system_message 'You are a pirate.'", "differs from template 'Hermes-2'"]),
], ids=["llm", "model", "rope", "template", "v2pe", "sliding", "moe", "layer_types",
        "system"])
def test_unknown_architecture(tmp_path, source, edit, patterns):
    hf = _folder(tmp_path, source, config_edit=edit)
    _fails(tmp_path, hf, UnknownArchitectureError, *patterns)


def test_image_token_id_needs_a_source(tmp_path, source):
    hf = _folder(tmp_path, source)
    (hf / "added_tokens.json").unlink()  # qwen2's default 151648 is outside the tiny vocab
    _fails(tmp_path, hf, ConversionError, "<IMG_CONTEXT>", "151648", "image_token_id=ID")
    stats = convert_hf_to_orbax(hf, tmp_path / "out", overrides=["image_token_id=300"])
    assert stats.tensors > 0
    conv = json.loads((tmp_path / "out" / "conversion.json").read_text())
    assert conv["image_token_id"] == 300 and conv["image_token_source"] == "override"


@pytest.mark.parametrize("damage,patterns", [
    ("truncate", ["model.safetensors is not a valid safetensors file", "not fully covered"]),
    ("garbage", ["model.safetensors is not a valid safetensors file", "header too large"]),
    ("no_weights", ["no checkpoint found", "model.safetensors"]),
    ("bad_config", ["cannot read the model's config.json", "config.json"]),
    ("no_config", ["config.json does not exist"]),
    ("bad_index", ["cannot read the checkpoint index", "weight_map"]),
])
def test_unreadable_files(tmp_path, source, damage, patterns):
    hf = _folder(tmp_path, source)
    st = hf / "model.safetensors"
    if damage == "truncate":
        st.write_bytes(st.read_bytes()[:-100])
    elif damage == "garbage":
        st.write_bytes(b"\xff" * 64)
    elif damage == "no_weights":
        st.unlink()
    elif damage == "bad_config":
        (hf / "config.json").write_text("{not json")
    elif damage == "no_config":
        (hf / "config.json").unlink()
    else:
        (hf / "model.safetensors.index.json").write_text(json.dumps({"files": []}))
    _fails(tmp_path, hf, CheckpointReadError, *patterns)


def test_failed_final_rename_restores_the_old_folder(tmp_path, monkeypatch):
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    real_replace = os.replace

    def replace(src, dst):
        if ".tmp-" in str(src):  # the new folder's rename into place
            raise OSError("rename failed")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(OSError, match="rename failed"):
        with fileio.atomic_folder(tmp_path / "out", overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    assert leftovers(tmp_path) == []
    with pytest.raises(FileExistsError, match="already exists"):
        with fileio.atomic_folder(tmp_path / "out"):
            pass
    monkeypatch.undo()
    with pytest.raises(ValueError, match="half"):
        with fileio.atomic_file(tmp_path / "out" / "keep.txt") as tmp:
            tmp.write_text("half")
            raise ValueError("half written")
    fileio.write_atomic(tmp_path / "out" / "new.txt", "done")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["keep.txt", "new.txt"]
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"


def test_longrope_export_needs_the_checkpoint_factors():
    cfg = load_model_config("tiny-phi3")  # a preset: LongRoPE lists left to the checkpoint
    for layout in LAYOUTS:
        with pytest.raises(ConversionError, match="short_factor.*CONVERTED/model_config.json"):
            hf_config_from_model(cfg, layout, "float32")
    half = cfg.llm.head_dim // 2
    rs = dataclasses.replace(cfg.llm.rope_scaling, short_factor=(1.5,) * half,
                             long_factor=(4.0,) * half)
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, rope_scaling=rs))
    llm = hf_config_from_model(cfg, "original", "float32")["llm_config"]
    assert llm["rope_scaling"]["long_factor"] == [4.0] * half


def test_existing_output_is_refused_then_replaced_with_overwrite(tmp_path, source, capsys):
    hf = _folder(tmp_path, source)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("old")
    code = cli.main(["--from-hf", str(hf), "--to", str(tmp_path / "out"), "--quiet"])
    assert code == 2  # the shell's one exit code for a user error (was 1 before issue 21)
    assert "already exists" in capsys.readouterr().err
    assert (tmp_path / "out" / "keep.txt").read_text() == "old"
    assert cli.main(["--from-hf", str(hf), "--to", str(tmp_path / "out"), "--overwrite"]) == 0
    captured = capsys.readouterr()
    n = len(read_tensors(hf))  # 65: the original layout fuses the ViT q/k/v
    assert f"{n}/{n}" in captured.err and "tensor/s" in captured.err  # the progress bar
    assert f"converted {n} tensors" in captured.out and " s -> " in captured.out
    assert not (tmp_path / "out" / "keep.txt").exists()
    assert (tmp_path / "out" / "params").is_dir() and leftovers(tmp_path) == []


def test_export_errors(tmp_path, source, capsys):
    hf = _folder(tmp_path, source)
    convert_hf_to_orbax(hf, tmp_path / "orbax")
    with pytest.raises(CheckpointReadError, match="not a converted folder.*--model-config"):
        export_to_hf(hf, tmp_path / "back")
    with pytest.raises(ConversionError, match="size '5 parsecs' is not understood"):
        export_to_hf(tmp_path / "orbax", tmp_path / "back", max_shard_size="5 parsecs")
    # a model config that does not match the stored parameters names the parameter
    code = cli.main(["--from-orbax", str(tmp_path / "orbax" / "params"), "--model-config",
                     "tiny-qwen2", "--to-hf", str(tmp_path / "back"), "--quiet"])
    assert code == 2  # the shell's one exit code for a user error (was 1 before issue 21)
    err = capsys.readouterr().err
    assert "error:" in err and "llm.embed_tokens" in err and "expected (512, 64)" in err
    assert not (tmp_path / "back").exists() and leftovers(tmp_path) == []
    # a bare params checkpoint plus the matching model config exports fine
    assert cli.main(["--from-orbax", str(tmp_path / "orbax" / "params"), "--model-config",
                     str(tmp_path / "orbax" / "model_config.json"), "--to-hf",
                     str(tmp_path / "back"), "--quiet"]) == 0
    assert "exported" in capsys.readouterr().out


def test_full_disk_while_converting_either_way_is_one_line(tmp_path, source, capfd):
    """A real full disk (a small tmpfs; without mount permission, a file size limit): one line
    naming the output, no Orbax log dump, nothing left behind, an older output untouched."""
    hf = _folder(tmp_path, source)
    good = tmp_path / "good"
    assert cli.main(["--from-hf", str(hf), "--to", str(good), "--quiet"]) == 0
    with limited_disk(tmp_path / "disk") as disk:
        old = disk.path / "old"
        old.mkdir()
        (old / "keep.txt").write_text("old")
        cases = {disk.path / "new": ["--from-hf", str(hf), "--to"],
                 old: ["--from-hf", str(hf), "--overwrite", "--to"],
                 disk.path / "back": ["--from-orbax", str(good), "--to-hf"]}
        for out, argv in cases.items():
            capfd.readouterr()
            with disk.full(16 << 10):
                code = cli.main([*argv, str(out), "--quiet"])
            err = capfd.readouterr().err
            assert code == 2 and err.startswith(f"error: {disk.message} writing {out}") and \
                err.count("\n") == 1, err[-3000:]
            assert leftovers(disk.path) == []
        assert sorted(p.name for p in disk.path.iterdir()) == ["old"]
        assert [p.name for p in old.iterdir()] == ["keep.txt"]
