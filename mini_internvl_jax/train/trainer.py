"""The training loop: resume or initialise, step, log, checkpoint, stop cleanly.

Metrics are read one step late (the host never waits for the step it just dispatched), except at
checkpoint steps, where the step's finiteness must be known before saving.

Resuming picks the newest step folder that restores (a damaged newest one is moved aside and
named), and refuses a changed learning rate, batch size or dataset unless the caller allows it.
The run also ends cleanly (final checkpoint, `stopped="data_exhausted"`) when a finite dataset
(`data.num_epochs`) runs out, and on SIGTERM / Ctrl-C (see `stopping`).
"""

from __future__ import annotations

import hashlib
import json
import sys
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

import grain
import jax
import numpy as np
from etils import epath
from flax import nnx

from mini_internvl_jax import configlib, fileio
from mini_internvl_jax.batch import to_global
from mini_internvl_jax.checkpoints.checkpointer import Checkpointer, CheckpointError
from mini_internvl_jax.checkpoints.checkpointer import run_meta as _run_meta
from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.train import preference_run
from mini_internvl_jax.train import setup as setup_lib
from mini_internvl_jax.train.batches import local_geometry, make_iterator, next_step_batch
from mini_internvl_jax.train.compile_cache import CacheStats, cache_dir, persistent_cache
from mini_internvl_jax.train.config import TrainConfig
from mini_internvl_jax.train.init_from import load_initial_params, model_config
from mini_internvl_jax.train.report import Reporter
from mini_internvl_jax.train.state import TrainState, abstract_like, split_params
from mini_internvl_jax.train.stopping import StopGuard

# What a resumed run may not change silently: the optimizer trajectory and the data stream.
GUARDED_KEYS = ("optim.lr", "batch_size", "data.meta_path", "data_fingerprint")


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


@dataclass
class RunResult:
    history: list[dict] = field(default_factory=list)  # one entry per step run here
    final_step: int = 0
    stopped: str = "done"  # done | preempted | data_exhausted | stop_after
    stop_signal: int | None = None  # the signal that stopped a preempted run (single process)
    state: TrainState | None = None
    frozen: nnx.State | None = None

    def params(self) -> nnx.State:
        """Every parameter (trainable and frozen) after the last step."""
        if self.state is None or self.frozen is None:
            raise ValueError("this RunResult holds no training state (run() fills it in)")
        return nnx.merge_state(self.state.params, self.frozen)


def _delete(tree) -> None:
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            x.delete()


def _digest(batch: dict) -> int:
    return zlib.crc32(np.ascontiguousarray(batch["input_ids"]).tobytes()
                      + np.ascontiguousarray(batch["labels"]).tobytes())


class FirstBatchReady:
    """Wraps the data iterator after pulling its first batch, before the model is built.

    A dataset in which nothing fits, or an empty one, then fails in seconds rather than after
    model initialisation and compilation; the first batch is handed out unchanged afterwards.
    Iterator state (Grain's checkpoint protocol: JSON bytes) is the position before it until
    it is consumed; restoring a position drops it.
    """

    def __init__(self, inner):
        self._inner = inner
        self._grain = isinstance(inner, grain.DatasetIterator)
        self._state_before = inner.get_state()
        try:
            self._first, self._error = next(inner), None
        except StopIteration as e:
            self._first, self._error = None, e
        self._pending = True

    def __iter__(self):
        return self

    def __next__(self):
        if self._pending:
            self._pending = False
            if self._error is not None:
                raise StopIteration
            return self._first
        return next(self._inner)

    def get_state(self) -> bytes:
        state = self._state_before if self._pending else self._inner.get_state()
        return state if isinstance(state, bytes) else json.dumps(state).encode()

    def set_state(self, state: bytes) -> None:
        self._pending = False
        self._inner.set_state(json.loads(state) if self._grain else state)

    def start_prefetch(self) -> None:
        if hasattr(self._inner, "start_prefetch"):
            self._inner.start_prefetch()


def data_fingerprint(cfg: TrainConfig) -> str | None:
    """sha256 of the data meta file, so a dataset edited in place counts as changed."""
    if cfg.data is None:
        return None
    try:
        return hashlib.sha256(epath.Path(cfg.data.meta_path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def run_meta(cfg: TrainConfig, model_cfg, step: int) -> dict:
    return {**_run_meta(cfg, model_cfg, step), "data_fingerprint": data_fingerprint(cfg)}


def _guarded(cfg_dict: dict, meta: dict) -> dict:
    out = {}
    for key in GUARDED_KEYS:
        if key == "data_fingerprint":
            out[key] = meta.get(key)
            continue
        v: Any = cfg_dict
        for part in key.split("."):
            v = v.get(part) if isinstance(v, dict) else None
        out[key] = v
    return out


def config_changes(cfg: TrainConfig, model_cfg, meta: dict) -> list[str]:
    """`key: old -> new` for each guarded setting that differs from the checkpoint's run."""
    if "train_config" not in meta:
        return []
    old = _guarded(meta["train_config"], meta)
    new = _guarded(configlib.to_dict(cfg), run_meta(cfg, model_cfg, 0))
    return [f"{k}: {old[k]!r} -> {new[k]!r}" for k in GUARDED_KEYS
            if old[k] != new[k] and not (k == "data_fingerprint" and None in (old[k], new[k]))]


def run(cfg: TrainConfig, *, devices=None, stop_after: int | None = None,
        allow_config_change: bool = False) -> RunResult:
    """Trains until `cfg.total_steps` (or SIGTERM / SIGINT, or the end of a finite dataset, or
    `stop_after` steps, which simulates a kill: no extra checkpoint is written).

    `allow_config_change` lets a resumed run use a learning rate, batch size or dataset other
    than the checkpoint's (the change is printed and recorded in the next checkpoints' meta).
    """
    with persistent_cache(cache_dir(cfg)) as cache:
        return _run(cfg, devices, stop_after, allow_config_change, cache)


def _run(cfg: TrainConfig, devices, stop_after: int | None, allow_config_change: bool,
         cache: CacheStats) -> RunResult:
    started = time.perf_counter()
    model_cfg = model_config(cfg)
    try:
        mesh = cfg.mesh.build(devices)
    except ValueError as e:  # sizes that do not match the devices: a config mistake
        raise ConfigError(f"mesh: {e}") from None
    setup_lib.check_batch_fits_mesh(cfg, mesh)
    init = None if cfg.init_from is None else (lambda m: load_initial_params(m, cfg, mesh))
    iterator = make_iterator(cfg, model_cfg)
    if cfg.data is not None:
        iterator = FirstBatchReady(iterator)
    for folder in (cfg.checkpoint.dir, cfg.log.dir):  # before the model is built
        if folder is not None:
            fileio.check_creatable(folder)
    s = setup_lib.build(cfg, mesh, model_cfg, init_params=init)
    state, frozen, rest = s.state, s.frozen, s.rest
    if preference_run.needs_reference_pass(cfg):  # stores the reference log-probs, then reads
        iterator = FirstBatchReady(preference_run.reference_pass(cfg, model_cfg, s,
                                                                 *local_geometry(cfg)))
    ckpt = None
    if cfg.checkpoint.dir is not None:
        ckpt = Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep,
                            async_save=cfg.checkpoint.async_save)
    start = 0
    allowed_changes: list[str] = []
    if ckpt is not None and not cfg.checkpoint.resume and ckpt.latest_step() is not None:
        ckpt.close()
        raise CheckpointError(f"checkpoint.dir {cfg.checkpoint.dir} already holds step "
                              f"{ckpt.latest_step()} and checkpoint.resume is false; use a new "
                              "directory (or resume: true)")
    if ckpt is not None and cfg.checkpoint.resume and ckpt.latest_step() is not None:
        params = nnx.merge_state(state.params, frozen)
        abs_params = abstract_like(params, jax.tree.map(lambda x: x.sharding, params))
        train = {"opt_state": state.opt_state, **_scalars(state)}
        abs_train = abstract_like(train, jax.tree.map(lambda x: x.sharding, train))
        _delete((params, train))
        try:
            start, out, note = ckpt.restore_newest_intact(params=abs_params, train=abs_train,
                                                          iterator=iterator)
        except CheckpointError:
            ckpt.close()
            raise
        if note and jax.process_index() == 0:
            print(f"warning: {note}", file=sys.stderr, flush=True)
        changes = config_changes(cfg, model_cfg, out["meta"])
        if changes and not allow_config_change:
            ckpt.close()
            raise CheckpointError(
                f"{cfg.checkpoint.dir} step {start} was trained with other settings ("
                + "; ".join(changes) + "); resuming would silently change the run. Restore "
                "them, use a new checkpoint.dir, or pass --allow-config-change")
        if changes and jax.process_index() == 0:
            print("resuming with changed settings (--allow-config-change): " + "; ".join(changes),
                  file=sys.stderr, flush=True)
        allowed_changes = changes
        trainable, frozen = split_params(out["params"], cfg.frozen_components)[:2]
        t = out["train"]
        state = TrainState(params=trainable, opt_state=t["opt_state"], step=t["step"],
                           rng=t["rng"], bad_steps=t["bad_steps"], skipped=t["skipped"],
                           extra=t.get("extra"))
    result = RunResult(final_step=start)
    primary = jax.process_index() == 0
    if start >= cfg.total_steps and primary:
        print(f"{cfg.checkpoint.dir} already holds step {start}, at or past total_steps "
              f"({cfg.total_steps}): nothing to do (raise total_steps to continue, or use a "
              "new checkpoint.dir)", flush=True)
    reporter = Reporter(cfg, model_cfg, start, mesh.size)
    pending = None
    last_saved = start

    def collect():
        step, metrics, extra = pending
        host = reporter.report(step, metrics, extra)
        result.history.append({"step": step, **host})
        if host["bad_steps"] >= cfg.max_bad_steps:
            raise TrainingDivergedError(
                f"{host['bad_steps']} consecutive steps with a non-finite loss or gradient "
                f"(up to step {step}); stopping. The last good checkpoint "
                f"({'step ' + str(last_saved) if ckpt else 'none: no checkpoint.dir'}) is kept.")
        return host

    def save(step: int) -> None:
        nonlocal last_saved
        if ckpt is None or step == last_saved:
            return
        ckpt.save(step, params=nnx.merge_state(state.params, frozen),
                  train={"opt_state": state.opt_state, **_scalars(state)}, iterator=iterator,
                  meta={**run_meta(cfg, model_cfg, step),
                        **({"resumed_with_changes": allowed_changes} if allowed_changes else {})})
        last_saved = step

    profile_last: int | None = None  # the last step a running trace covers
    saved = lambda: f"step {last_saved} in {cfg.checkpoint.dir}" if ckpt else "none"
    try:
        with StopGuard(cfg.checkpoint.stop_grace_s, saved) as guard:
            for step in range(start + 1, cfg.total_steps + 1):
                if cfg.log.profile_start == step and primary:
                    trace_dir = cfg.log.dir or cfg.checkpoint.dir
                    assert trace_dir is not None, "TrainConfig checks profile_start has a dir"
                    jax.profiler.start_trace(trace_dir)
                    profile_last = step + cfg.log.profile_steps - 1
                try:
                    host_batch, stats = next_step_batch(iterator, cfg.optim.grad_accum)
                except StopIteration:  # a finite dataset (data.num_epochs) ran out
                    result.stopped = "data_exhausted"
                    if pending is not None:
                        host = collect()
                        pending = None
                        if host["bad_steps"] == 0:
                            save(step - 1)
                    break
                if step == start + 1:
                    reporter.log_samples(step, host_batch)
                extra = {"data_digest": _digest(host_batch),
                         "real_tiles": int(host_batch["image_flags"].sum()) * jax.process_count(),
                         **stats}
                batch = to_global(host_batch, s.batch_sh)
                with jax.set_mesh(mesh):
                    state, metrics = s.step_fn(state, frozen, rest, batch)
                if step == start + 1:  # restart cost: setup + compile (or cache) + 1 step
                    jax.block_until_ready(metrics)
                    reporter.first_step_ready(time.perf_counter() - started, cache)
                if pending is not None:
                    collect()
                pending = (step, metrics, extra)
                if ckpt is not None:  # an async save that failed stops the run here
                    ckpt.raise_if_failed()
                if step == profile_last:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profile_last = None
                preempted = guard.should_stop(step)
                if ckpt is not None and (step % cfg.checkpoint.every == 0 or preempted
                                         or step == cfg.total_steps):
                    host = collect()
                    pending = None
                    if host["bad_steps"] == 0:
                        save(step)
                result.final_step = step
                if preempted:
                    result.stopped = "preempted"
                    result.stop_signal = guard.signum
                    break
                if stop_after is not None and step - start >= stop_after:
                    result.stopped = "stop_after"
                    break
            if pending is not None:
                collect()
    finally:
        if profile_last is not None:
            jax.profiler.stop_trace()
        reporter.close()
        if ckpt is not None:
            ckpt.close()
    if primary and result.stopped == "data_exhausted" and cfg.data is not None:
        print(f"the data ran out (data.num_epochs: {cfg.data.num_epochs}) before step "
              f"{result.final_step + 1} of {cfg.total_steps}; final checkpoint: {saved()}",
              flush=True)
    if primary and result.history:
        where = f"; checkpoint step {last_saved} in {cfg.checkpoint.dir}" if ckpt else ""
        print(f"{result.stopped}: steps {result.history[0]['step']}-{result.final_step}, loss "
              f"{reporter.first_loss:.4f} -> {reporter.last_loss:.4f}{where}", flush=True)
    result.state, result.frozen = state, frozen
    return result


def _scalars(state: TrainState) -> dict:
    return {"step": state.step, "rng": state.rng, "bad_steps": state.bad_steps,
            "skipped": state.skipped, **({} if state.extra is None else {"extra": state.extra})}
