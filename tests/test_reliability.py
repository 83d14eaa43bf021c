"""Faults a real run meets: nothing fits the batch, signals while the pipeline stalls, a damaged
newest checkpoint, NaN weights, a finite dataset running out, temp folders of killed runs, a
resume with changed settings, and cluster variables holding junk. Every case that could hang
runs in a subprocess with a timeout."""

import json
import logging
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml
from tensorboardX.proto.event_pb2 import SessionLog

from mini_internvl_jax import fileio
from mini_internvl_jax.checkpoints.run import CheckpointError, read_meta
from mini_internvl_jax.cli import export as export_cli
from mini_internvl_jax.cli import train as train_cli
from mini_internvl_jax.cli.train import multihost_reason
from mini_internvl_jax.train import resume, trainer
from mini_internvl_jax.train.config import train_config_from_dict
from mini_internvl_jax.train.init_from import model_config
from mini_internvl_jax.train.metrics import MetricsLog
from tests.helpers import events
from tests.helpers.limited_disk import limited_disk
from tests.test_train_run import BASE, ONE, compilation_cache, config  # noqa: F401 (fixture)

ROOT = Path(__file__).resolve().parent.parent
ENV = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=1",
       "JAX_PLATFORMS": "cpu", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def demo_data(tmp_path_factory):
    from mini_internvl_jax.tools.demo import write_demo

    out = tmp_path_factory.mktemp("demo") / "demo_data"
    write_demo(out, num_stage1=16, num_stage2=16)
    return out


def run_one(**over):
    stop_after = over.pop("stop_after", None)
    allow = over.pop("allow_config_change", False)
    return trainer.run(config(mesh=ONE, **over), devices=jax.devices()[:1],
                       stop_after=stop_after, allow_config_change=allow)


# 1. nothing fits ------------------------------------------------------------------------------

def test_demo_with_tiny_seq_len_fails_fast_instead_of_spinning(demo_data, tmp_path):
    cmd = [sys.executable, "-m", "mini_internvl_jax.cli.train", "--config", "demo",
           f"tokenizer={demo_data}/tokenizers/qwen2",
           f"data.meta_path={demo_data}/stage2_meta.json", "seq_len=24",
           f"checkpoint.dir={tmp_path}/run", "log.progress_bar=false"]
    p = subprocess.run(cmd, cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=60)
    assert p.returncode == 2, p.stderr[-2000:]
    last = p.stderr.strip().splitlines()[-1]
    assert last.startswith("error: no record fits the batch"), p.stderr[-2000:]
    assert "too_long: " in last and "no_targets: " in last and "seq_len (24)" in last
    assert "Traceback" not in p.stderr


# 2. signals -----------------------------------------------------------------------------------

def _start_stalled(tmp_path, grace_s, stall_after):
    cfg = {**BASE, "mesh": ONE, "stall_after": stall_after,
           "checkpoint": {"dir": str(tmp_path / "ckpt"), "every": 1, "async_save": False,
                          "stop_grace_s": grace_s}}
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(cfg))
    p = subprocess.Popen([sys.executable, "-m", "tests.helpers.stalled_train", str(path)],
                         cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=lambda: [lines.put(x) for x in p.stdout], daemon=True).start()
    while "STALLED" not in lines.get(timeout=300):  # start-up (and steps) on a busy machine
        pass
    return p


def _finish(p, timeout):
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"the run did not end within {timeout} s")
    return p.returncode, err


def test_sigterm_during_a_stall_ends_after_the_grace_period(tmp_path):
    p = _start_stalled(tmp_path, grace_s=3, stall_after=1)  # step 1 is saved, then a stall
    start = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc, err = _finish(p, timeout=30)
    assert rc == 143, err[-2000:]
    assert time.monotonic() - start >= 2.5
    assert "no step boundary within 3 s of SIGTERM" in err and "step 1 in" in err
    assert "Traceback" not in err
    assert read_meta(str(tmp_path / "ckpt"))[0] == 1  # the last checkpoint is intact


def test_second_sigterm_ends_a_stalled_run_at_once(tmp_path):
    p = _start_stalled(tmp_path, grace_s=600, stall_after=0)
    p.send_signal(signal.SIGTERM)
    time.sleep(1)
    assert p.poll() is None  # the first one only asks for a save at the next boundary
    start = time.monotonic()
    p.send_signal(signal.SIGTERM)
    rc, err = _finish(p, timeout=20)
    assert rc == 143 and time.monotonic() - start < 10, err[-2000:]
    assert "second stop signal (SIGTERM)" in err and "Traceback" not in err


def _signal_after(monkeypatch, signum, index):
    real = trainer.make_iterator

    def signalling(*a, **k):
        it = real(*a, **k)
        original = type(it).__next__

        def next_and_signal(self):
            b = original(self)
            if self.index == index:
                os.kill(os.getpid(), signum)
            return b

        monkeypatch.setattr(type(it), "__next__", next_and_signal)
        return it

    monkeypatch.setattr(trainer, "make_iterator", signalling)


@pytest.mark.parametrize("signum,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_ctrl_c_and_sigterm_save_and_exit_with_a_distinct_code(tmp_path, monkeypatch, capsys,
                                                               signum, code):
    cfg_path = tmp_path / "run.yaml"
    cfg_path.write_text(yaml.safe_dump({**BASE, "mesh": ONE,
                                        "checkpoint": {"dir": str(tmp_path / "ckpt")}}))
    _signal_after(monkeypatch, signum, 2)
    monkeypatch.setattr(jax, "devices", lambda *a: jax.local_devices()[:1])
    assert train_cli.main(["--config", str(cfg_path)]) == code
    out = capsys.readouterr()
    name = signal.Signals(signum).name
    assert f"stopped by {name} at step 2; checkpoint saved" in out.out
    assert "Traceback" not in out.err and "KeyboardInterrupt" not in out.err
    assert read_meta(str(tmp_path / "ckpt"))[0] == 2


# 3. a damaged newest checkpoint ---------------------------------------------------------------

def test_resume_falls_back_to_the_newest_intact_checkpoint(tmp_path, capsys, reference):
    ckpt = {"dir": str(tmp_path), "every": 1, "keep": 3, "async_save": False}
    run_one(checkpoint=ckpt, stop_after=3)
    files = [f for f in (tmp_path / "3" / "params").rglob("*") if f.is_file()
             and f.parent.name == "d"]
    assert files
    for f in files:  # a disk error in the newest step's array data
        f.write_bytes(b"\0" * 7)
    capsys.readouterr()
    r = run_one(checkpoint=ckpt)
    err = capsys.readouterr().err
    assert "checkpoint step 3" in err and "unreadable" in err and "from step 2" in err
    assert [h["step"] for h in r.history] == [3, 4]
    assert [h["loss"] for h in r.history] == [h["loss"] for h in reference.history[2:]]
    assert list(tmp_path.glob("3.corrupt-*")) and (tmp_path / "4").is_dir()


def test_resume_into_a_different_model_still_names_the_mismatch(tmp_path):
    ckpt = {"dir": str(tmp_path), "every": 1, "async_save": False}
    run_one(checkpoint=ckpt, stop_after=1)
    with pytest.raises(CheckpointError, match="cannot be restored into this run"):
        run_one(checkpoint=ckpt, lora={"rank": 2})
    assert (tmp_path / "1").is_dir() and not list(tmp_path.glob("*.corrupt-*"))


# 6. NaN / Inf weights -------------------------------------------------------------------------

def test_nonfinite_weights_are_named_at_conversion_and_at_load(tmp_path, capsys):
    torch = pytest.importorskip("torch")
    from mini_internvl_jax.checkpoints.resolve import load_pretrained
    from mini_internvl_jax.cli import convert as convert_cli
    from mini_internvl_jax.convert.errors import CheckpointMismatchError
    from mini_internvl_jax.convert.finite import NonFiniteWeightsError
    from mini_internvl_jax.convert.orbax_io import restore_numpy, save_params
    from tests.helpers.checkpoints import leftovers, native_model, save_state, write_original

    model, hf_cfg = native_model("qwen2")
    sd = write_original(tmp_path / "hf", model, hf_cfg, "qwen2")
    good = tmp_path / "good"
    assert convert_cli.main(["--from-hf", str(tmp_path / "hf"), "--to", str(good),
                             "--quiet"]) == 0
    names = sorted(n for n in sd if n.endswith("mlp.down_proj.weight"))[:2]
    sd[names[0]][0, :3] = float("nan")
    sd[names[1]][1, 0] = float("inf")
    (tmp_path / "hf" / "model.safetensors").unlink()
    save_state(tmp_path / "hf", sd)
    capsys.readouterr()
    assert convert_cli.main(["--from-hf", str(tmp_path / "hf"), "--to", str(tmp_path / "bad"),
                             "--quiet"]) == 2  # the shell's user-error code (was 1)
    err = capsys.readouterr().err
    assert f"'{names[0]}' (3 NaN, 0 Inf)" in err and f"'{names[1]}' (0 NaN, 1 Inf)" in err
    assert not (tmp_path / "bad").exists() and leftovers(tmp_path) == []

    host = restore_numpy(good / "params")
    key = sorted(k for k in host if k[-1] in ("kernel", "weight") and host[k].ndim == 2)[0]
    host[key] = host[key].copy()
    host[key][0, 0] = np.nan
    shutil.rmtree(good / "params")
    save_params(good / "params", host)
    with pytest.raises(NonFiniteWeightsError, match=r"'" + ".".join(map(str, key))
                       + r"' \(1 NaN, 0 Inf\)"):
        load_pretrained(good)

    host[key] = np.ones(host[key].shape, np.int32)  # an integer tensor is refused, not cast
    shutil.rmtree(good / "params")
    save_params(good / "params", host)
    with pytest.raises(CheckpointMismatchError, match=r"hold integers") as e:
        load_pretrained(good)
    assert f"{'.'.join(map(str, key))} (int32)" in str(e.value)
    del torch


# 7. a finite dataset runs out -----------------------------------------------------------------

def test_running_out_of_data_saves_a_final_checkpoint(demo_data, tmp_path, capsys):
    cfg = train_config_from_dict({
        **BASE, "mesh": ONE, "tokenizer": f"{demo_data}/tokenizers/qwen2", "seq_len": 256,
        "max_tiles": 32, "total_steps": 1000,
        "data": {"meta_path": f"{demo_data}/stage1_meta.json", "template": "Hermes-2",
                 "max_dynamic_patch": 1, "num_epochs": 1, "shuffle": False},
        "checkpoint": {"dir": str(tmp_path), "every": 1000, "async_save": False}})
    r = trainer.run(cfg, devices=jax.devices()[:1])
    assert r.stopped == "data_exhausted" and 1 <= r.final_step < 16  # 16 samples
    assert read_meta(str(tmp_path))[0] == r.final_step
    assert "the data ran out (data.num_epochs: 1)" in capsys.readouterr().out


# 8. temp folders of killed conversions --------------------------------------------------------

def test_stale_temporaries_of_killed_runs_are_removed(tmp_path, capsys):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    host = __import__("socket").gethostname()
    stale = tmp_path / f".out.tmp-{host}-{dead}-deadbeef"
    old_style = tmp_path / ".out.tmp-0badc0de"  # named before owners were recorded
    live = tmp_path / f".out.tmp-{host}-{os.getpid()}-cafe0000"  # a concurrent run's
    other = tmp_path / ".other.tmp-x-1-00000000"
    for d in (stale, old_style, live, other):
        d.mkdir()
        (d / "blob").write_bytes(b"x" * 1000)
    hour_ago = time.time() - 3600
    os.utime(old_style, (hour_ago, hour_ago))
    with fileio.atomic_folder(tmp_path / "out") as tmp:
        (tmp / "f").write_text("new")
    assert not stale.exists() and not old_style.exists()
    assert live.exists() and other.exists() and (tmp_path / "out" / "f").read_text() == "new"
    err = capsys.readouterr().err
    assert "removed 2 stale temporary folder(s)" in err and stale.name in err


# 9. resume with changed settings; metrics.jsonl without duplicates ---------------------------

def test_resume_refuses_changed_settings_and_logs_each_step_once(tmp_path, capsys):
    ckpt = {"dir": str(tmp_path), "every": 2, "async_save": False}
    log = {**BASE["log"], "every": 1}
    run_one(checkpoint=ckpt, log=log, stop_after=3)  # killed after step 3; saved at 2
    with pytest.raises(CheckpointError) as e:
        run_one(checkpoint=ckpt, log=log, optim={**BASE["optim"], "lr": 5e-3},
                batch_size=4, max_tiles=8)
    assert "optim.lr: 0.01 -> 0.005" in str(e.value) and "batch_size: 8 -> 4" in str(e.value)
    assert "--allow-config-change" in str(e.value)
    r = run_one(checkpoint=ckpt, log=log, optim={**BASE["optim"], "lr": 5e-3},
                allow_config_change=True)
    assert "resuming with changed settings (--allow-config-change): optim.lr" in \
        capsys.readouterr().err
    assert [h["step"] for h in r.history] == [3, 4]
    assert read_meta(str(tmp_path))[1]["resumed_with_changes"] == ["optim.lr: 0.01 -> 0.005"]
    rows = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3, 4]


def test_a_resumed_log_drops_and_purges_the_redone_steps(tmp_path):
    rows = "".join(json.dumps({"step": i, "loss": 1.0}) + "\n" for i in (1, 2, 3, 4))
    (tmp_path / "metrics.jsonl").write_text(rows + '{"step": 5, "lo')  # cut short by a kill
    log = MetricsLog(tmp_path, tensorboard=True, start_step=2)  # resumed from step 2
    log.write(3, {"loss": 0.5})
    log.close()
    steps = [json.loads(x)["step"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]
    starts = [ev.step for f in tmp_path.glob("events.out.tfevents.*")
              for ev in events.read_events(f) if ev.session_log.status == SessionLog.START]
    assert starts == [3]  # TensorBoard hides the earlier run's events from step 3 on


def test_a_changed_dataset_is_a_changed_setting(tmp_path):
    meta = tmp_path / "meta.json"
    meta.write_text("{}")
    base = {**BASE, "tokenizer": "tok", "data": {"meta_path": str(meta)}}
    cfg = train_config_from_dict(base)
    mc = model_config(cfg)
    saved = resume.run_meta(cfg, mc, 2)
    assert resume.config_changes(cfg, mc, saved) == []
    meta.write_text('{"x": {}}')  # edited in place
    assert [c.split(":")[0] for c in resume.config_changes(cfg, mc, saved)] == \
        ["data_fingerprint"]
    other = train_config_from_dict({**base, "data": {"meta_path": str(tmp_path / "b.json")}})
    assert "data.meta_path" in resume.config_changes(other, mc, saved)[0]


# 11. multi-host detection ---------------------------------------------------------------------

LIBTPU_WARNING = ("WARNING: could not determine TPU worker hostnames, falling back to "
                  "localhost, internal error: metadata server unreachable")


@pytest.mark.parametrize("env,want", [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": LIBTPU_WARNING}, None),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"SLURM_JOB_ID": "123", "SLURM_NTASKS": "1"}, None),
    ({"OMPI_COMM_WORLD_SIZE": "one"}, None),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "not an address, sorry"}, None),
    ({"TPU_WORKER_HOSTNAMES": "t1v-n-0,t1v-n-1,10.0.0.3"}, "TPU_WORKER_HOSTNAMES lists 3 hosts"),
    ({"SLURM_JOB_ID": "9", "SLURM_NTASKS": "4"}, "SLURM_NTASKS=4"),
    ({"OMPI_COMM_WORLD_SIZE": "2"}, "OMPI_COMM_WORLD_SIZE=2"),
    ({"MEGASCALE_COORDINATOR_ADDRESS": "10.1.2.3:8080"}, "MEGASCALE_COORDINATOR_ADDRESS is set"),
])
def test_multihost_is_detected_from_real_values_only(env, want):
    assert multihost_reason(env) == want


def test_train_cli_does_not_initialise_distributed_on_libtpu_warning_text(monkeypatch):
    monkeypatch.setenv("TPU_WORKER_HOSTNAMES", LIBTPU_WARNING)
    for key in ("SLURM_JOB_ID", "SLURM_NTASKS", "SLURM_NPROCS", "OMPI_COMM_WORLD_SIZE",
                "MEGASCALE_COORDINATOR_ADDRESS"):
        monkeypatch.delenv(key, raising=False)
    calls = []
    monkeypatch.setattr(jax.distributed, "initialize", lambda *a, **k: calls.append(1))
    train_cli.maybe_initialize_distributed("auto", train_cli.parse_args(["--config", "x.yaml"]))
    assert calls == []



# 4. a full disk while saving a checkpoint -----------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    """Four uninterrupted steps: the losses every resumed run must reproduce."""
    return run_one()


# The async save (the default) is the harder case; the sync one fails inside the same handler.
@pytest.mark.parametrize("async_save", [pytest.param(False, marks=pytest.mark.slow), True],
                         ids=["sync", "async"])
def test_a_failed_checkpoint_save_stops_the_run_and_resume_continues(tmp_path, monkeypatch,
                                                                     capfd, caplog, async_save,
                                                                     reference):
    """A real full disk (tmpfs; without mount permission, a real file size limit): the run
    stops at the failed save with one line naming the step folder, leaves no partial step, and
    a resume from the last saved step gives the uninterrupted run's losses."""
    with limited_disk(tmp_path / "disk") as disk:
        ckpt_dir = disk.path / "ckpt"
        ckpt = {"dir": str(ckpt_dir), "every": 1, "async_save": async_save}
        log = {**BASE["log"], "every": 1, "dir": str(tmp_path / "logs")}
        run_one(checkpoint=ckpt, log=log, stop_after=1)  # step 1 is saved
        cfg_path = tmp_path / "run.yaml"
        cfg_path.write_text(yaml.safe_dump({**BASE, "mesh": ONE, "checkpoint": ckpt, "log": log}))
        monkeypatch.setattr(jax, "devices", lambda *a: jax.local_devices()[:1])
        capfd.readouterr()
        with disk.full(64 << 10):
            code = train_cli.main(["--config", str(cfg_path)])
        out, err = capfd.readouterr()
        assert code == 2, err[-3000:]
        assert err.strip() == err.strip().splitlines()[0], err[-3000:]  # one line, no logs
        assert err.startswith(f"error: checkpoint step 2 not saved: {disk.message} writing "
                              f"{ckpt_dir}/2"), err
        assert "(the last saved step, 1, is intact)" in err
        # Orbax's own reports of the failure (shown as tracebacks outside pytest) were dropped
        assert not [r for r in caplog.records if r.name in ("absl", "asyncio")
                    and r.levelno >= logging.ERROR], caplog.text[-3000:]
        assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1"]  # no partial step folder
        rows = [json.loads(x)["step"] for x in
                (tmp_path / "logs" / "metrics.jsonl").read_text().splitlines()]
        # A sync save fails at step 2; an async one is noticed at the next step boundary.
        assert rows == [1, 2] if not async_save else rows[:2] == [1, 2] and len(rows) <= 3
        r = run_one(checkpoint=ckpt, log=log)
        if async_save:  # mivl-export of the run onto the same full disk: one line as well
            capfd.readouterr()
            with disk.full(16 << 10):
                code = export_cli.main([str(ckpt_dir), str(disk.path / "export")])
            err = capfd.readouterr().err
            assert code == 2 and err.startswith(
                f"error: {disk.message} writing {disk.path / 'export'}") and \
                err.count("\n") == 1, err[-3000:]
            assert not (disk.path / "export").exists() and not list(disk.path.glob(".export*"))
            capfd.readouterr()  # a run asked for fewer steps than it holds: nothing to do
            assert run_one(checkpoint=ckpt, log=log, total_steps=2).history == []
            assert (f"{ckpt_dir} already holds step 4, at or past total_steps (2): nothing to "
                    "do") in capfd.readouterr().out
    assert [h["step"] for h in r.history] == [2, 3, 4]
    assert [h["loss"] for h in r.history] == [h["loss"] for h in reference.history[1:]]
