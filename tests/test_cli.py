"""The commands' own argument handling and error exits (their work is tested elsewhere:
test_train_cli, test_chat_eval_cli, test_eval_tasks_cli, test_convert_errors, test_train_init,
test_install)."""

import json

import pytest

from mini_internvl_jax.cli import demo_data, export
from mini_internvl_jax.configlib import ConfigError


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


def test_one_error_policy_for_every_command(capsys):
    """A user error: one `error:` line and exit 2; a bug: its traceback (re-raised)."""
    from mini_internvl_jax.cli._shell import ExitCode, command
    from mini_internvl_jax.configlib import ConfigError

    def fails_with(exc):
        def run(argv):
            raise exc
        return command(run)

    assert fails_with(ConfigError("optim.lr: must be positive"))([]) == ExitCode.USER_ERROR == 2
    assert capsys.readouterr().err == "error: optim.lr: must be positive\n"
    assert fails_with(FileExistsError("out already exists"))([]) == 2
    with pytest.raises(ValueError, match="a bug"):
        fails_with(ValueError("a bug"))([])
    assert command(lambda argv: len(argv))(["a", "b"]) == 2  # the run's own code passes through


def test_overrides_parse_anywhere_among_the_flags():
    from mini_internvl_jax.cli import train
    from mini_internvl_jax.cli._shell import is_override, parse_args

    args = parse_args(train.build_parser(), ["total_steps=2", "--config", "demo", "--aot-tpu",
                                             "v5e:2x2", "mesh.tensor=2", "optim.lr=1e-5"])
    assert args.aot_tpu == "v5e:2x2" and args.config == "demo"
    assert args.overrides == ["total_steps=2", "mesh.tensor=2", "optim.lr=1e-5"]
    assert [is_override(w) for w in ("mesh.tensor=2", "What is 2+2=?", "a b=c", "x")] == [
        True, False, False, False]


def test_chat_and_eval_take_the_mesh_as_overrides(capsys):
    from mini_internvl_jax.cli._shell import build_mesh, model_overrides

    assert model_overrides([]).mesh == model_overrides(["mesh.data=1"]).mesh
    assert build_mesh(model_overrides([]).mesh) is None
    mesh = build_mesh(model_overrides(["mesh.tensor=2"]).mesh)
    assert dict(mesh.shape) == {"data": 1, "fsdp": 1, "tensor": 2}
    for bad, want in ((["mesh.tensr=2"], "tensr"), (["mesh.tensor=0"], "mesh.tensor"),
                      (["mesh.data=64"], "64 devices")):
        with pytest.raises(ConfigError, match=want):
            build_mesh(model_overrides(bad).mesh)


def test_importing_a_command_changes_no_environment(monkeypatch):
    """Environment changes belong in `main`, not at import (cli/convert.py set JAX_PLATFORMS)."""
    import importlib
    import os
    import pkgutil
    import sys

    import mini_internvl_jax.cli as cli

    monkeypatch.delenv("JAX_PLATFORMS", raising=False)  # what a setdefault at import would set
    for info in pkgutil.iter_modules(cli.__path__):
        name = f"{cli.__name__}.{info.name}"
        monkeypatch.delitem(sys.modules, name, raising=False)
        before = dict(os.environ)
        importlib.import_module(name)
        assert dict(os.environ) == before, name
