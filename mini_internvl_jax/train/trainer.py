"""The training loop: a run's parts, its initial state, then steps with periodic hooks.

`run` prepares the parts (`Run`: mesh, data, model and jitted step, checkpoint folder), takes
the initial state from `resume.initial_state` (fresh, or the newest intact checkpoint), and
`train_loop` steps until `total_steps`. Periodic work is a list of `Hook`s, each with an
`every`: reading metrics (one step late, so the host never waits for the step it just
dispatched), the profiler window, preemption and checkpoint saves (which read their step's
metrics first: a step is saved only if it was finite). Too many non-finite steps in a row stop
the run (`TrainingDivergedError`) when their metrics are read. The run also ends cleanly (final
checkpoint, `stopped="data_exhausted"`) when a finite dataset (`data.num_epochs`) runs out, and
on SIGTERM / Ctrl-C (see `stopping`).
"""

from __future__ import annotations

import dataclasses
import json
import time
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import grain
import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh

from mini_internvl_jax import fileio
from mini_internvl_jax.checkpoints.checkpointer import Checkpointer
from mini_internvl_jax.config import ModelConfig
from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.train import preference_run
from mini_internvl_jax.train import setup as setup_lib
from mini_internvl_jax.train.batches import make_iterator, next_step_batch
from mini_internvl_jax.train.compile_cache import CacheStats, cache_dir, persistent_cache
from mini_internvl_jax.train.config import TrainConfig
from mini_internvl_jax.train.init_from import load_initial_params, model_config, open_init_source
from mini_internvl_jax.train.report import Reporter
from mini_internvl_jax.train.resume import initial_state, run_meta
from mini_internvl_jax.train.state import TrainState
from mini_internvl_jax.train.stopping import StopGuard


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


@dataclass
class RunResult:
    history: list[dict] = field(default_factory=list)  # one entry per step run here
    final_step: int = 0
    stopped: str = "done"  # done | preempted | data_exhausted | stop_after
    stop_signal: int | None = None  # the signal that stopped a preempted run (single process)
    state: TrainState | None = None

    def params(self) -> nnx.State:
        """Every parameter (trainable and frozen) after the last step."""
        if self.state is None:
            raise ValueError("this RunResult holds no training state (run() fills it in)")
        return self.state.all_params()


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


@dataclass
class Run:
    """The parts of a run fixed before its first step."""

    cfg: TrainConfig
    model_cfg: ModelConfig
    mesh: Mesh
    setup: setup_lib.Setup
    iterator: Any
    ckpt: Checkpointer | None
    started: float  # perf_counter() on entering the trainer
    cache: CacheStats


def prepare(cfg: TrainConfig, devices, cache: CacheStats) -> Run:
    """Mesh, data (its first batch pulled before the model is built, so an empty dataset fails
    in seconds), the `init_from` folder (opened once), model, jitted step, checkpoint folder."""
    started = time.perf_counter()
    source = open_init_source(cfg.init_from) if cfg.init_from else None
    model_cfg = model_config(cfg, source)
    try:
        mesh = cfg.mesh.build(devices)
    except ValueError as e:  # sizes that do not match the devices: a config mistake
        raise ConfigError(f"mesh: {e}") from None
    setup_lib.check_batch_fits_mesh(cfg, mesh)
    iterator = make_iterator(cfg, model_cfg)
    if cfg.data is not None:
        iterator = FirstBatchReady(iterator)
    for folder in (cfg.checkpoint.dir, cfg.log.dir):  # before the model is built
        if folder is not None:
            fileio.check_creatable(folder)
    init = None if source is None else (lambda m: load_initial_params(m, cfg, mesh, source))
    s = setup_lib.build(cfg, mesh, model_cfg, init_params=init)
    if preference_run.needs_reference_pass(cfg):  # stores the reference log-probs, then reads
        local = s.batch.per_host(jax.process_count())
        iterator = FirstBatchReady(preference_run.reference_pass(cfg, model_cfg, s, local.rows,
                                                                 local.tiles))
    ckpt = None if cfg.checkpoint.dir is None else Checkpointer(
        cfg.checkpoint.dir, keep=cfg.checkpoint.keep, async_save=cfg.checkpoint.async_save)
    return Run(cfg, model_cfg, mesh, s, iterator, ckpt, started, cache)


class Loop:
    """What changes while a run steps: the state, the metrics not yet read, the last save."""

    def __init__(self, run: Run, state: TrainState, start: int, changes: list[str],
                 stop_after: int | None):
        self.run, self.state, self.start = run, state, start
        self.changes = changes  # guarded settings this resume changed (recorded in the meta)
        self.stop_after = stop_after
        self.reporter = Reporter(run.cfg, run.model_cfg, start, run.mesh.size)
        self.result = RunResult(final_step=start)
        self.pending: tuple[int, Any, dict] | None = None  # (step, device metrics, host extras)
        self.last_saved = start
        self.stop: str | None = None  # why the loop ends after this step

    def saved(self) -> str:
        ckpt_dir = self.run.cfg.checkpoint.dir
        return f"step {self.last_saved} in {ckpt_dir}" if self.run.ckpt else "none"

    def collect(self) -> dict | None:
        """Reads the pending step's metrics (waiting for it) and reports them; the divergence
        stop: too many non-finite steps in a row end the run here."""
        if self.pending is None:
            return None
        (step, metrics, extra), self.pending = self.pending, None
        host = self.reporter.report(step, metrics, extra)
        self.result.history.append({"step": step, **host})
        if host["bad_steps"] >= self.run.cfg.max_bad_steps:
            where = self.saved() if self.run.ckpt else "none: no checkpoint.dir"
            raise TrainingDivergedError(
                f"{host['bad_steps']} consecutive steps with a non-finite loss or gradient "
                f"(up to step {step}); stopping. The last good checkpoint ({where}) is kept.")
        return host

    def save(self, step: int) -> None:
        """Saves `step` once its metrics say it was finite (and not saved already)."""
        host = self.collect()
        if self.run.ckpt is None or host is None or host["bad_steps"] or step == self.last_saved:
            return
        meta = dataclasses.replace(run_meta(self.run.cfg, self.run.model_cfg, step),
                                   resumed_with_changes=tuple(self.changes))
        self.run.ckpt.save(step, params=self.state.all_params(), train=self.state.train_item(),
                           iterator=self.run.iterator, meta=meta)
        self.last_saved = step


@dataclass
class Hook:
    """Periodic work after a step: `fn(loop, step)` at every `every`-th step and at the last
    one (`total_steps`, or a preempted run's)."""

    every: int
    fn: Callable[[Loop, int], None]

    def due(self, step: int, last: bool) -> bool:
        return last or step % self.every == 0


class ProfilerWindow:
    """A jax.profiler trace of steps `log.profile_start` .. + `log.profile_steps` - 1."""

    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.first = cfg.log.profile_start if jax.process_index() == 0 else None
        self.last: int | None = None  # the last step a running trace covers

    def before(self, step: int) -> None:
        if step == self.first:
            trace_dir = self.cfg.log.dir or self.cfg.checkpoint.dir
            assert trace_dir is not None, "TrainConfig checks profile_start has a dir"
            jax.profiler.start_trace(trace_dir)
            self.last = step + self.cfg.log.profile_steps - 1

    def __call__(self, loop: Loop, step: int) -> None:
        if step == self.last:
            jax.block_until_ready(loop.state)
            self.close()
        self.before(step + 1)

    def close(self) -> None:
        if self.last is not None:
            jax.profiler.stop_trace()
            self.last = None


def hooks(run: Run, guard: StopGuard, profiler: ProfilerWindow) -> list[Hook]:
    """The periodic work of a run, in the order it runs after each step."""

    def preemption(loop: Loop, step: int) -> None:
        if guard.should_stop(step):
            loop.stop, loop.result.stopped, loop.result.stop_signal = \
                "preempted", "preempted", guard.signum

    def stop_after(loop: Loop, step: int) -> None:  # a simulated kill: nothing more is saved
        if loop.stop is None and loop.stop_after is not None \
                and step - loop.start >= loop.stop_after:
            loop.stop = loop.result.stopped = "stop_after"

    out = [Hook(1, profiler), Hook(1, preemption)]
    if run.ckpt is not None:
        ckpt = run.ckpt  # an async save that failed in the background stops the run here
        out.append(Hook(1, lambda loop, step: ckpt.raise_if_failed()))
        out.append(Hook(run.cfg.checkpoint.every, Loop.save))
    return [*out, Hook(1, stop_after)]


def train_loop(loop: Loop, hooks: list[Hook], profiler: ProfilerWindow) -> None:
    """Steps from `loop.start` + 1 until `total_steps`, the end of the data, or a stop."""
    run, cfg = loop.run, loop.run.cfg
    profiler.before(loop.start + 1)
    for step in range(loop.start + 1, cfg.total_steps + 1):
        try:
            host_batch, stats = next_step_batch(run.iterator, cfg.optim.grad_accum)
        except StopIteration:  # a finite dataset (data.num_epochs) ran out
            loop.result.stopped = "data_exhausted"
            loop.save(step - 1)
            break
        first = step == loop.start + 1
        if first:
            loop.reporter.log_samples(step, host_batch)
        extra = {"data_digest": _digest(host_batch),
                 "real_tiles": int(host_batch["image_flags"].sum()) * jax.process_count(),
                 **stats}
        batch = run.setup.place(host_batch)
        with jax.set_mesh(run.mesh):
            loop.state, metrics = run.setup.step_fn(loop.state, batch)
        if first:  # restart cost: setup + compile (or cache) + 1 step
            jax.block_until_ready(metrics)
            loop.reporter.first_step_ready(time.perf_counter() - run.started, run.cache)
        loop.collect()  # the previous step's metrics: one step late
        loop.pending = (step, metrics, extra)
        for hook in hooks:
            if hook.due(step, last=step == cfg.total_steps or loop.stop == "preempted"):
                hook.fn(loop, step)
        loop.result.final_step = step
        if loop.stop is not None:
            break
    loop.collect()


def run(cfg: TrainConfig, *, devices=None, stop_after: int | None = None,
        allow_config_change: bool = False) -> RunResult:
    """Trains until `cfg.total_steps` (or SIGTERM / SIGINT, or the end of a finite dataset, or
    `stop_after` steps, which simulates a kill: no extra checkpoint is written).

    `allow_config_change` lets a resumed run use a learning rate, batch size or dataset other
    than the checkpoint's (the change is printed and recorded in the next checkpoints' meta).
    """
    with persistent_cache(cache_dir(cfg)) as cache:
        r = prepare(cfg, devices, cache)
        profiler = ProfilerWindow(cfg)
        loop = None
        try:
            state, start, changes = initial_state(cfg, r.model_cfg, r.setup.state, r.ckpt,
                                                  r.iterator,
                                                  allow_config_change=allow_config_change)
            loop = Loop(r, state, start, changes, stop_after)
            if start >= cfg.total_steps and jax.process_index() == 0:
                print(f"{cfg.checkpoint.dir} already holds step {start}, at or past "
                      f"total_steps ({cfg.total_steps}): nothing to do (raise total_steps to "
                      "continue, or use a new checkpoint.dir)", flush=True)
            with StopGuard(cfg.checkpoint.stop_grace_s, loop.saved) as guard:
                train_loop(loop, hooks(r, guard, profiler), profiler)
        finally:
            profiler.close()
            if loop is not None:
                loop.reporter.close()
            if r.ckpt is not None:
                r.ckpt.close()
    assert loop is not None  # an error before the loop raises above
    _summary(loop)
    loop.result.state = loop.state
    return loop.result


def _summary(loop: Loop) -> None:
    cfg, result = loop.run.cfg, loop.result
    if jax.process_index() != 0:
        return
    if result.stopped == "data_exhausted" and cfg.data is not None:
        print(f"the data ran out (data.num_epochs: {cfg.data.num_epochs}) before step "
              f"{result.final_step + 1} of {cfg.total_steps}; final checkpoint: {loop.saved()}",
              flush=True)
    if result.history:
        where = f"; checkpoint {loop.saved()}" if loop.run.ckpt else ""
        print(f"{result.stopped}: steps {result.history[0]['step']}-{result.final_step}, loss "
              f"{loop.reporter.first_loss:.4f} -> {loop.reporter.last_loss:.4f}{where}",
              flush=True)
