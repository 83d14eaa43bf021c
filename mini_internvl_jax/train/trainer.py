"""The training loop: resume or initialise, step, log, checkpoint, stop cleanly.

Metrics are read one step late (the host never waits for the step it just dispatched), except at
checkpoint steps, where the step's finiteness must be known before saving.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass, field

import jax
import numpy as np
from flax import nnx

from mini_internvl_jax.batch import to_global
from mini_internvl_jax.train import setup as setup_lib
from mini_internvl_jax.train.batches import make_iterator, next_step_batch
from mini_internvl_jax.train.checkpoint import (
    Checkpointer,
    CheckpointError,
    PreemptionGuard,
    run_meta,
)
from mini_internvl_jax.train.compile_cache import CacheStats, cache_dir, persistent_cache
from mini_internvl_jax.train.config import TrainConfig
from mini_internvl_jax.train.init_from import load_initial_params, model_config
from mini_internvl_jax.train.report import Reporter
from mini_internvl_jax.train.state import TrainState, abstract_like, split_params


class TrainingDivergedError(RuntimeError):
    """Too many consecutive non-finite steps; the last good checkpoint is kept."""


@dataclass
class RunResult:
    history: list[dict] = field(default_factory=list)  # one entry per step run here
    final_step: int = 0
    stopped: str = "done"  # done | preempted | stop_after
    state: TrainState | None = None
    frozen: nnx.State | None = None

    def params(self) -> nnx.State:
        """Every parameter (trainable and frozen) after the last step."""
        return nnx.merge_state(self.state.params, self.frozen)


def _delete(tree) -> None:
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            x.delete()


def _digest(batch: dict) -> int:
    return zlib.crc32(np.ascontiguousarray(batch["input_ids"]).tobytes()
                      + np.ascontiguousarray(batch["labels"]).tobytes())


def run(cfg: TrainConfig, *, devices=None, stop_after: int | None = None) -> RunResult:
    """Trains until `cfg.total_steps` (or SIGTERM, or `stop_after` steps, which simulates a kill:
    no extra checkpoint is written)."""
    with persistent_cache(cache_dir(cfg)) as cache:
        return _run(cfg, devices, stop_after, cache)


def _run(cfg: TrainConfig, devices, stop_after: int | None, cache: CacheStats) -> RunResult:
    started = time.perf_counter()
    model_cfg = model_config(cfg)
    mesh = cfg.mesh.build(devices)
    setup_lib.check_batch_fits_mesh(cfg, mesh)
    init = None if cfg.init_from is None else (lambda m: load_initial_params(m, cfg, mesh))
    s = setup_lib.build(cfg, mesh, model_cfg, init_params=init)
    state, frozen, rest = s.state, s.frozen, s.rest
    iterator = make_iterator(cfg, model_cfg)
    ckpt = None
    if cfg.checkpoint.dir is not None:
        ckpt = Checkpointer(cfg.checkpoint.dir, keep=cfg.checkpoint.keep,
                            async_save=cfg.checkpoint.async_save)
    start = 0
    if ckpt is not None and not cfg.checkpoint.resume and ckpt.latest_step() is not None:
        ckpt.close()
        raise CheckpointError(f"checkpoint.dir {cfg.checkpoint.dir} already holds step "
                              f"{ckpt.latest_step()} and checkpoint.resume is false; use a new "
                              "directory (or resume: true)")
    if ckpt is not None and cfg.checkpoint.resume and ckpt.latest_step() is not None:
        start = ckpt.latest_step()
        params = nnx.merge_state(state.params, frozen)
        abs_params = abstract_like(params, jax.tree.map(lambda x: x.sharding, params))
        train = {"opt_state": state.opt_state, **_scalars(state)}
        abs_train = abstract_like(train, jax.tree.map(lambda x: x.sharding, train))
        _delete((params, train))
        out = ckpt.restore(start, params=abs_params, train=abs_train, iterator=iterator)
        trainable, frozen = split_params(out["params"], cfg.frozen_components)[:2]
        t = out["train"]
        state = TrainState(params=trainable, opt_state=t["opt_state"], step=t["step"],
                           rng=t["rng"], bad_steps=t["bad_steps"], skipped=t["skipped"])
    result = RunResult(final_step=start)
    primary = jax.process_index() == 0
    if start >= cfg.total_steps and primary:
        print(f"{cfg.checkpoint.dir} already holds step {start} = total_steps: nothing to do "
              "(raise total_steps to continue, or use a new checkpoint.dir)", flush=True)
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
                  meta=run_meta(cfg, model_cfg, step))
        last_saved = step

    profiling = False
    try:
        with PreemptionGuard() as guard:
            for step in range(start + 1, cfg.total_steps + 1):
                if cfg.log.profile_start == step and primary:
                    jax.profiler.start_trace(cfg.log.dir or cfg.checkpoint.dir)
                    profiling = True
                host_batch, stats = next_step_batch(iterator, cfg.optim.grad_accum)
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
                if profiling and step == cfg.log.profile_start + cfg.log.profile_steps - 1:
                    jax.block_until_ready(state)
                    jax.profiler.stop_trace()
                    profiling = False
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
                    break
                if stop_after is not None and step - start >= stop_after:
                    result.stopped = "stop_after"
                    break
            if pending is not None:
                collect()
    finally:
        if profiling:
            jax.profiler.stop_trace()
        reporter.close()
        if ckpt is not None:
            ckpt.close()
    if primary and result.history:
        where = f"; checkpoint step {last_saved} in {cfg.checkpoint.dir}" if ckpt else ""
        print(f"{result.stopped}: steps {result.history[0]['step']}-{result.final_step}, loss "
              f"{reporter.first_loss:.4f} -> {reporter.last_loss:.4f}{where}", flush=True)
    result.state, result.frozen = state, frozen
    return result


def _scalars(state: TrainState) -> dict:
    return {"step": state.step, "rng": state.rng, "bad_steps": state.bad_steps,
            "skipped": state.skipped}
