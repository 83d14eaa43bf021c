"""The commands' own argument handling and error exits (their work is tested elsewhere:
test_train_cli, test_chat_eval_cli, test_convert_errors, test_train_init, test_install)."""

import json

from mini_internvl_jax.cli import demo_data, export


def test_export_names_a_missing_run(tmp_path, capsys):
    assert export.main([str(tmp_path / "no-run"), str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "no-run" in err and "does not exist" in err
    assert not (tmp_path / "out").exists()


def test_demo_data_writes_then_refuses_to_overwrite_without_force(tmp_path, capsys):
    out = tmp_path / "demo"
    assert demo_data.main([str(out), "--num-stage1", "2", "--num-stage2", "4"]) == 0
    manifest = json.loads((out / "demo_manifest.json").read_text())
    assert manifest["stage1"]["samples"] == 2 and manifest["stage2"]["samples"] == 4
    assert "2 stage-1 and 4 stage-2 samples" in capsys.readouterr().out
    assert demo_data.main([str(out)]) == 2
    assert "--force" in capsys.readouterr().err
    assert demo_data.main([str(out), "--force", "--num-stage1", "3", "--num-stage2", "4"]) == 0
    assert json.loads((out / "demo_manifest.json").read_text())["stage1"]["samples"] == 3
