"""A table of ordinary mistakes across the command-line tools. Each must give a non-zero exit,
one `error:` line naming the file or field, no Python traceback, no partial output, and leave
earlier outputs untouched. The CLIs run in-process through their `main(argv)`; every case fails
before a model would be built, so the table runs in seconds."""

import errno
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.helpers import bad_inputs as h


@dataclass(frozen=True)
class Case:
    cli: str  # key of h.CLIS
    argv: tuple[str, ...]  # "{x}" placeholders filled from the fixture paths
    expect: tuple[str, ...]  # substrings of the error line
    setup: str | None = None  # name of a function in h.SETUPS (monkeypatches, files)
    no_output: tuple[str, ...] = ()  # paths that must not exist afterwards
    intact: tuple[str, ...] = field(default=())  # outputs that must be unchanged


CASES = {
    # --- train -------------------------------------------------------------------------------
    "train: missing config file": Case("train", ("--config", "{tmp}/nope.yaml"),
                                       ("nope.yaml", "does not exist")),
    "train: invalid YAML": Case("train", ("--config", "{tmp}/broken.yaml"),
                                ("broken.yaml", "not valid YAML")),
    "train: duplicate YAML key": Case("train", ("--config", "{tmp}/dup.yaml"),
                                      ("dup.yaml", "duplicate key 'lr'")),
    "train: unknown key": Case("train", ("--config", "{train_yaml}", "nosuch=1"),
                               ("unknown key", "nosuch")),
    "train: override without =": Case("train", ("--config", "{train_yaml}", "seq_len"),
                                      ("seq_len", "key=value")),
    "train: wrong type": Case("train", ("--config", "{train_yaml}", "batch_size=abc"),
                              ("batch_size", "integer")),
    "train: negative lr": Case("train", ("--config", "{train_yaml}", "optim.lr=-1"),
                               ("optim.lr", "positive")),
    "train: zero steps": Case("train", ("--config", "{train_yaml}", "total_steps=0"),
                              ("total_steps", ">= 1")),
    "train: unknown preset": Case("train", ("--config", "{train_yaml}", "model=tiny-nope"),
                                  ("tiny-nope", "unknown model preset")),
    "train: bad YAML in override": Case("train", ("--config", "{train_yaml}", "seq_len=[1"),
                                        ("seq_len", "not valid YAML")),
    "train: data without tokenizer": Case(
        "train", ("--config", "{train_yaml}", "data.meta_path={demo}/stage2_meta.json"),
        ("tokenizer", "required")),
    "train: missing meta file": Case(
        "train", ("--config", "{train_yaml}", "data.meta_path={tmp}/nope.json",
                  "tokenizer={demo}/tokenizers/qwen2"),
        ("nope.json",), no_output=("{tmp}/ckpt",)),
    "train: meta not JSON": Case(
        "train", ("--config", "{train_yaml}", "data.meta_path={tmp}/broken.json",
                  "tokenizer={demo}/tokenizers/qwen2"), ("broken.json",),
        no_output=("{tmp}/ckpt",)),
    "train: meta without annotation": Case(
        "train", ("--config", "{train_yaml}", "data.meta_path={tmp}/no_annotation.json",
                  "tokenizer={demo}/tokenizers/qwen2"), ("missing \"annotation\"",),
        no_output=("{tmp}/ckpt",)),
    "train: missing tokenizer": Case(
        "train", ("--config", "{train_yaml}", "data.meta_path={demo}/stage2_meta.json",
                  "tokenizer={tmp}/no_tokenizer"), ("no_tokenizer",),
        no_output=("{tmp}/ckpt",)),
    "train: nothing fits seq_len": Case(
        "train", ("--config", "{train_yaml}", "data.meta_path={demo}/stage2_meta.json",
                  "tokenizer={demo}/tokenizers/qwen2", "data.template=Hermes-2",
                  "seq_len=24"), ("no record fits", "seq_len (24)"),
        no_output=("{tmp}/ckpt",)),
    "train: init_from missing": Case("train", ("--config", "{train_yaml}",
                                               "init_from={tmp}/nope"), ("nope",)),
    "train: init_from corrupt folder": Case(
        "train", ("--config", "{train_yaml}", "init_from={corrupt}", "model=tiny-qwen2"),
        ("corrupt",), no_output=("{tmp}/ckpt",)),
    "train: mesh larger than the machine": Case(
        "train", ("--config", "{train_yaml}", "mesh.fsdp=1", "mesh.data=64", "batch_size=64"),
        ("mesh", "64 devices")),
    "train: checkpoint dir under a file": Case(
        "train", ("--config", "{train_yaml}", "checkpoint.dir={tmp}/a_file/ckpt"),
        ("a_file",), intact=("{tmp}/a_file",)),
    # --- convert -----------------------------------------------------------------------------
    "convert: missing HF folder": Case("convert", ("--from-hf", "{tmp}/nope", "--to",
                                                   "{tmp}/out"), ("nope", "does not exist"),
                                       no_output=("{tmp}/out",)),
    "convert: HF folder without config": Case(
        "convert", ("--from-hf", "{tmp}/empty_dir", "--to", "{tmp}/out"), ("config.json",),
        no_output=("{tmp}/out",)),
    "convert: config.json not JSON": Case(
        "convert", ("--from-hf", "{bad_hf}", "--to", "{tmp}/out"), ("config.json",),
        no_output=("{tmp}/out",)),
    "convert: output exists": Case(
        "convert", ("--from-hf", "{hf}", "--to", "{previous}"), ("previous", "--overwrite"),
        intact=("{previous}",)),
    "convert: image_token_id=abc": Case(
        "convert", ("--from-hf", "{hf}", "--to", "{tmp}/out", "image_token_id=abc"),
        ("image_token_id", "abc", "integer"),
        no_output=("{tmp}/out",)),
    "convert: override without =": Case(
        "convert", ("--from-hf", "{hf}", "--to", "{tmp}/out", "template"),
        ("template", "key=value"), no_output=("{tmp}/out",)),
    "convert: unknown template": Case(
        "convert", ("--from-hf", "{hf}", "--to", "{tmp}/out", "template=nope"),
        ("template", "nope"), no_output=("{tmp}/out",)),
    "convert: NaN weights": Case("convert", ("--from-hf", "{nan_hf}", "--to", "{tmp}/out"),
                                 ("NaN", "down_proj"), no_output=("{tmp}/out",)),
    "convert: destination under a file": Case(
        "convert", ("--from-hf", "{hf}", "--to", "{tmp}/a_file/out"), ("a_file",),
        intact=("{tmp}/a_file",)),
    "export-hf: corrupt folder": Case(
        "convert", ("--from-orbax", "{corrupt}", "--to-hf", "{tmp}/out"),
        ("corrupt", "damaged"), no_output=("{tmp}/out",)),
    "export-hf: missing folder": Case(
        "convert", ("--from-orbax", "{tmp}/nope", "--to-hf", "{tmp}/out"), ("nope",),
        no_output=("{tmp}/out",)),
    "export-hf: output exists": Case(
        "convert", ("--from-orbax", "{converted}", "--to-hf", "{previous}"),
        ("previous", "--overwrite"), intact=("{previous}",)),
    # --- export of a training run ------------------------------------------------------------
    "export: run folder without a finished step": Case(
        "export", ("{tmp}/unsaved_run", "{tmp}/out"),
        ("unsaved_run is a training run folder with no finished checkpoint step",),
        no_output=("{tmp}/out",)),
    "export: --step 999": Case(
        "export", ("{corrupt_run}", "{tmp}/out", "--step", "999"),
        ("has no checkpoint step 999; its steps: 1",), no_output=("{tmp}/out",)),
    "export: missing run folder": Case("export", ("{tmp}/nope", "{tmp}/out"), ("nope",),
                                       no_output=("{tmp}/out",)),
    "export: not a run folder": Case("export", ("{converted}", "{tmp}/out"),
                                     ("converted", "not a training run"),
                                     no_output=("{tmp}/out",)),
    "export: corrupt run folder": Case("export", ("{corrupt_run}", "{tmp}/out"),
                                       ("corrupt_run", "unreadable"),
                                       no_output=("{tmp}/out",)),
    "export: output exists": Case("export", ("{corrupt_run}", "{previous}"),
                                  ("previous", "--overwrite"), intact=("{previous}",)),
    # --- demo data ---------------------------------------------------------------------------
    "demo: run twice without --force": Case("demo", ("{demo}",), ("--force",),
                                            intact=("{demo}/stage2_meta.json",)),
    "demo: --force on a foreign folder": Case("demo", ("{previous}", "--force"),
                                              ("not a demo folder",), intact=("{previous}",)),
    "demo: destination under a file": Case("demo", ("{tmp}/a_file/demo",), ("a_file",),
                                           intact=("{tmp}/a_file",)),
    "demo: disk full": Case("demo", ("{tmp}/out",), ("no space left",),
                            setup="write_bytes_disk_full", no_output=("{tmp}/out",)),
    "train: mesh.tensor=3 with --aot-tpu v5e:2x2": Case(
        "train", ("--config", "{train_yaml}", "mesh.tensor=3", "--aot-tpu", "v5e:2x2"),
        ("mesh:", "--aot-tpu v5e:2x2", "4 chips")),
    "train: --aot-tpu not a topology": Case(
        "train", ("--config", "{train_yaml}", "--aot-tpu", "v5e-2x2"),
        ("'v5e-2x2' is not a TPU topology", "v5e:2x2")),
    "train: gs:// data without the gcs extra": Case(
        "train", ("--config", "{train_yaml}", "data.meta_path=gs://bucket/meta.json",
                  "tokenizer={demo}/tokenizers/qwen2"),
        ("gs://", "pip install 'mini-internvl-jax[gcs]'"), setup="without_gcsfs",
        no_output=("{tmp}/ckpt",)),
    # --- evaluate ----------------------------------------------------------------------------
    "evaluate: missing data file": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "vqa", "--data", "{tmp}/n.jsonl"),
        ("n.jsonl", "does not exist")),
    "evaluate: line not JSON": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "vqa", "--data",
                     "{tmp}/broken.jsonl"), ("broken.jsonl:2", "not valid JSON")),
    "evaluate: missing question": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "vqa", "--data",
                     "{tmp}/no_question.jsonl"), ("no_question.jsonl:1", "'question'")),
    "evaluate: missing image (checked first)": Case(
        "evaluate", ("--checkpoint", "{tmp}/nope", "--task", "vqa", "--data",
                     "{tmp}/missing_image.jsonl", "--out", "{tmp}/pred.jsonl"),
        ("gone.png", "item 'b'"), no_output=("{tmp}/pred.jsonl",)),
    "evaluate: --max-new-tokens 0": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "vqa", "--data",
                     "{tmp}/ok.jsonl", "--max-new-tokens", "0"), ("--max-new-tokens", ">= 1")),
    "evaluate: --batch-size 0": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "vqa", "--data",
                     "{tmp}/ok.jsonl", "--batch-size", "0"), ("--batch-size", ">= 1")),
    "evaluate: missing checkpoint": Case(
        "evaluate", ("--checkpoint", "{tmp}/nope", "--task", "vqa", "--data", "{tmp}/ok.jsonl"),
        ("nope",)),
    "evaluate: mmbench answer letter": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "mmbench", "--data",
                     "{tmp}/bad_letter.jsonl"), ("bad_letter.jsonl:1", "'E'")),
    "evaluate: --limit -2": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "vqa", "--data",
                     "{tmp}/ok.jsonl", "--limit", "-2"), ("--limit must be >= 1", "got -2")),
    "evaluate: --tensorboard under a file (checked first)": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "vqa", "--data", "{tmp}/ok.jsonl",
                     "--out", "{tmp}/res.json", "--tensorboard", "{tmp}/a_file/tb"),
        ("a_file/tb", "not writable"), no_output=("{tmp}/res.json",)),
    "evaluate: video num_frames 500": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "vqa", "--data",
                     "{tmp}/many_frames.jsonl"),
        ("many_frames.jsonl:1", "'num_frames' must be a positive integer, at most 64", "500")),
    "evaluate: mathvista question_type": Case(
        "evaluate", ("--checkpoint", "{converted}", "--task", "mathvista", "--data",
                     "{tmp}/mathvista_type.jsonl"),
        ("mathvista_type.jsonl:1", "question_type must be one of multi_choice, free_form",
         "'essay'")),
    "evaluate: gs:// without the gcs extra": Case(
        "evaluate", ("--checkpoint", "gs://bucket/model", "--task", "vqa", "--data",
                     "{tmp}/ok.jsonl"), ("pip install 'mini-internvl-jax[gcs]'",),
        setup="without_gcsfs"),
    # --- chat --------------------------------------------------------------------------------
    "chat: --num-frames 500": Case("chat", ("--checkpoint", "{converted}", "--num-frames",
                                            "500", "hi"), ("--num-frames", "from 1 to 64")),
    "chat: gs:// without the gcs extra": Case(
        "chat", ("--checkpoint", "gs://bucket/model", "hi"),
        ("pip install 'mini-internvl-jax[gcs]'",), setup="without_gcsfs"),
    "chat: missing checkpoint": Case("chat", ("--checkpoint", "{tmp}/nope", "hi"), ("nope",)),
    "chat: missing image": Case("chat", ("--checkpoint", "{converted}", "--image",
                                         "{tmp}/gone.png", "hi"), ("gone.png",)),
    "chat: --max-new-tokens 0": Case("chat", ("--checkpoint", "{converted}",
                                              "--max-new-tokens", "0", "hi"),
                                     ("--max-new-tokens", ">= 1")),
    "chat: corrupt checkpoint": Case("chat", ("--checkpoint", "{corrupt}", "hi"),
                                     ("corrupt",)),
}


def test_the_table_is_large_enough():
    assert len(CASES) >= 40
    assert {c.cli for c in CASES.values()} == set(h.CLIS)


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input(name, fixtures, tmp_path, monkeypatch, capsys):
    case = CASES[name]
    paths = {**fixtures, "tmp": str(tmp_path), "previous": f"{tmp_path}/previous",
             "train_yaml": f"{tmp_path}/train.yaml"}
    h.prepare(tmp_path)
    fill = lambda s: s.format(**paths)  # noqa: E731
    before = {p: h.snapshot(Path(fill(p))) for p in case.intact}
    if case.setup:
        h.SETUPS[case.setup](monkeypatch)
    code, err = h.run(case.cli, [fill(a) for a in case.argv], capsys)
    assert code not in (0, None), err
    assert "Traceback" not in err, err
    lines = [x for x in err.splitlines() if "error" in x.lower()]
    assert len(lines) == 1, err
    for want in case.expect:
        assert fill(want) in lines[0], lines[0]
    for p in case.no_output:
        assert not Path(fill(p)).exists(), fill(p)
    assert h.leftovers(tmp_path) == [] and h.leftovers(Path(fixtures["shared"])) == []
    for p, snap in before.items():
        assert h.snapshot(Path(fill(p))) == snap, p


@pytest.fixture(scope="module")
def fixtures(tmp_path_factory):
    return h.build_fixtures(tmp_path_factory.mktemp("bad_inputs"))


def test_disk_error_lines():
    """The classifier behind the one-line messages, on the errors Python and TensorStore give."""
    from mini_internvl_jax.errors import disk_error

    assert disk_error(OSError(errno.ENOSPC, "No space left on device", "/d/x")) == (
        "no space left on device writing /d/x; free some space or choose another place")
    assert disk_error(OSError(errno.EROFS, "Read-only file system", "/ro/x")) == (
        "/ro/x is not writable (Read-only file system)")
    ts = ValueError('DATA_LOSS: Error writing local file "/ckpt/3/d/abc": '
                    '[OS error 28: No space left on device]')
    assert disk_error(ts).startswith("no space left on device writing /ckpt/3/d/abc")
    assert disk_error(ValueError("shape mismatch")) is None
