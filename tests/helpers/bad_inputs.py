"""Fixtures and fault injections for tests/test_bad_inputs.py."""

from __future__ import annotations

import errno
import importlib
import json
import pathlib
from pathlib import Path

import yaml

CLIS = {
    "train": "mini_internvl_jax.cli.train",
    "convert": "mini_internvl_jax.cli.convert",
    "export": "mini_internvl_jax.cli.export",
    "demo": "mini_internvl_jax.cli.demo_data",
    "evaluate": "mini_internvl_jax.cli.evaluate",
    "chat": "mini_internvl_jax.cli.chat",
}

TRAIN = {
    "model": "tiny-qwen2", "batch_size": 8, "seq_len": 32, "max_tiles": 16, "total_steps": 2,
    "synthetic": {"tiles_per_sample": 1, "samples_per_row": 2},
    "compute": {"dtype": "float32", "remat": "none"}, "loss_chunk": 8,
    "mesh": {"data": 1, "fsdp": -1, "tensor": 1},
    "log": {"progress_bar": False, "tensorboard": False},
}


def run(cli: str, argv: list[str], capsys) -> tuple[int | None, str]:
    """(exit code, stderr) of one CLI call in this process."""
    capsys.readouterr()
    try:
        code = importlib.import_module(CLIS[cli]).main(argv)
    except SystemExit as e:  # argparse
        code = e.code
    return code, capsys.readouterr().err


def leftovers(root: Path) -> list[str]:
    return [str(p) for p in Path(root).rglob("*") if ".tmp-" in p.name or ".old-" in p.name]


def snapshot(path: Path):
    if path.is_file():
        return path.read_bytes()
    return sorted((str(p.relative_to(path)), p.read_bytes() if p.is_file() else None)
                  for p in path.rglob("*"))


def prepare(tmp: Path) -> None:
    """Per-test inputs: small files a case points at, and a 'previous output'."""
    cfg = {**TRAIN, "checkpoint": {"dir": str(tmp / "ckpt")}}
    (tmp / "train.yaml").write_text(yaml.safe_dump(cfg))
    (tmp / "broken.yaml").write_text("model: [tiny-qwen2\n")
    (tmp / "dup.yaml").write_text("model: tiny-qwen2\noptim:\n  lr: 1.0e-3\n  lr: 2.0e-3\n")
    (tmp / "broken.json").write_text("{not json")
    (tmp / "no_annotation.json").write_text(json.dumps({"d": {"root": "images"}}))
    (tmp / "empty_dir").mkdir()
    (tmp / "a_file").write_text("a file, not a folder")
    (tmp / "previous").mkdir()
    (tmp / "unsaved_run").mkdir()  # a run killed before its first checkpoint
    (tmp / "unsaved_run" / "metrics.jsonl").write_text('{"step": 1, "loss": 1.0}\n')
    (tmp / "previous" / "keep.txt").write_text("earlier output")
    from PIL import Image

    Image.new("RGB", (32, 32), "red").save(tmp / "red.png")
    rows = {
        "broken.jsonl": ['{"id": "a", "question": "q", "answer": "x"}', "{oops"],
        "no_question.jsonl": ['{"id": "a", "answer": "x"}'],
        "many_frames.jsonl": ['{"id": "a", "video": "clip.mp4", "num_frames": 500, '
                              '"question": "q", "answer": "x"}'],
        "mathvista_type.jsonl": ['{"pid": "1", "query": "q", "question_type": "essay", '
                                 '"answer_type": "text", "answer": "a", "image": "red.png"}'],
        "missing_image.jsonl": ['{"id": "a", "image": "red.png", "question": "q", "answer": "x"}',
                                '{"id": "b", "image": "gone.png", "question": "q", "answer": "x"}'],
        "ok.jsonl": ['{"id": "a", "image": "red.png", "question": "q", "answer": "x"}'],
        "bad_letter.jsonl": ['{"id": "a", "question": "q", "options": ["x", "y"], '
                             '"answer": "E"}'],
    }
    for name, lines in rows.items():
        (tmp / name).write_text("\n".join(lines) + "\n")


def build_fixtures(root: Path) -> dict[str, str]:
    """Shared, read-only inputs: demo data, HF folders (good, NaN, bad config), a converted
    folder, a damaged converted folder and a damaged training run."""
    import jax.numpy as jnp
    import torch

    from mini_internvl_jax.checkpoints.checkpointer import Checkpointer
    from mini_internvl_jax.checkpoints.run import RunMeta
    from mini_internvl_jax.convert.importer import convert_hf_to_orbax
    from mini_internvl_jax.tools.demo import write_demo
    from tests.helpers.checkpoints import native_model, save_state, write_original

    write_demo(root / "demo", num_stage1=16, num_stage2=16)
    model, hf_cfg = native_model("qwen2")
    sd = write_original(root / "hf", model, hf_cfg, "qwen2")
    convert_hf_to_orbax(root / "hf", root / "converted")

    nan = root / "nan_hf"
    write_original(nan, model, hf_cfg, "qwen2")
    name = sorted(n for n in sd if n.endswith("mlp.down_proj.weight"))[0]
    sd[name][0, 0] = torch.nan
    (nan / "model.safetensors").unlink()
    save_state(nan, sd)

    bad = root / "bad_hf"
    write_original(bad, model, hf_cfg, "qwen2")
    (bad / "config.json").write_text("{not json")

    corrupt = root / "corrupt"
    convert_hf_to_orbax(root / "hf", corrupt)
    for f in (corrupt / "params").rglob("*"):
        if f.is_file() and f.parent.name == "d":
            f.write_bytes(b"xx")

    run = root / "corrupt_run"
    ck = Checkpointer(str(run), keep=1, async_save=False)
    ck.save(1, params={"w": jnp.zeros(2)}, train={"step": jnp.zeros((), jnp.int32)},
            iterator=None, meta=RunMeta({}, {}, 1))
    ck.close()
    (run / "1" / "meta" / "metadata").write_text("{broken")
    return {"shared": str(root), "demo": str(root / "demo"), "hf": str(root / "hf"),
            "nan_hf": str(nan), "bad_hf": str(bad), "converted": str(root / "converted"),
            "corrupt": str(corrupt), "corrupt_run": str(run)}


def _no_space(path) -> OSError:
    return OSError(errno.ENOSPC, "No space left on device", str(path))


def without_gcsfs(monkeypatch) -> None:
    """The `gcs` extra not installed: importing gcsfs fails, as on a machine without it."""
    import sys

    monkeypatch.setitem(sys.modules, "gcsfs", None)


def write_bytes_disk_full(monkeypatch) -> None:
    def write_bytes(self, data):
        raise _no_space(self)

    monkeypatch.setattr(pathlib.Path, "write_bytes", write_bytes)


SETUPS = {f.__name__: f for f in (without_gcsfs, write_bytes_disk_full)}
