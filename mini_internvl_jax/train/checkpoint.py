"""Orbax checkpoints of a training run, and stopping cleanly on SIGTERM / preemption.

A step folder holds four items: `params` (every parameter, frozen and LoRA included, so a
checkpoint alone is a complete model), `train` (optimizer state, step, RNG, bad-step counters),
`data` (each host's iterator position, through Grain's handler) and `meta` (the configs, as
JSON). Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save never damages the checkpoints already there. Restores take abstract targets carrying
the current mesh's shardings, so a run saved on 8 devices resumes on 4.
"""

from __future__ import annotations

import json
import signal
import threading

import grain
import jax
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from mini_internvl_jax import configlib
from mini_internvl_jax.convert.run_folder import CheckpointError, absolute_path


class _IteratorSnapshot:
    """An iterator position frozen at save time (async saves finish while training goes on)."""

    def __init__(self, iterator):
        state = iterator.get_state()
        self._state = state if isinstance(state, bytes) else json.dumps(state).encode()

    def get_state(self) -> bytes:
        return self._state


class Checkpointer:
    def __init__(self, directory: str, *, keep: int, async_save: bool):
        self.directory = absolute_path(directory)
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, *, params, train: dict, iterator, meta: dict) -> None:
        args = {"params": ocp.args.StandardSave(params), "train": ocp.args.StandardSave(train),
                "meta": ocp.args.JsonSave(meta)}
        if iterator is not None:
            args["data"] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator))
        self.manager.save(step, args=ocp.args.Composite(**args), force=True)

    def restore(self, step: int, *, params, train=None, iterator=None) -> dict:
        """Restores `params` (and `train`, the iterator's position) onto the given targets."""
        args = {"params": ocp.args.StandardRestore(params), "meta": ocp.args.JsonRestore()}
        if train is not None:
            args["train"] = ocp.args.StandardRestore(train)
        if iterator is not None:
            args["data"] = grain.checkpoint.CheckpointRestore(iterator)
        try:
            out = self.manager.restore(step, args=ocp.args.Composite(**args))
        except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
            raise CheckpointError(
                f"checkpoint {self.directory / str(step)} does not match this run (different "
                f"model, LoRA or trainable parameters, or a different host count?): {e}. To "
                f"start a new run from its weights, use init_from instead of resuming.") from e
        return {k: out[k] for k in args}

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def run_meta(cfg, model_cfg, step: int) -> dict:
    """What a step folder records about its run (convert/run_folder.py reads it back)."""
    return {"train_config": configlib.to_dict(cfg), "model_config": configlib.to_dict(model_cfg),
            "step": step, "process_count": jax.process_count()}


class PreemptionGuard:
    """Turns SIGTERM into a request to save and stop at the next step boundary.

    With several processes the decision must be the same everywhere; JAX's preemption sync
    point (set up by jax.distributed) provides it. A single process uses its own signal flag.
    """

    def __init__(self):
        self._flag = threading.Event()
        self._previous = None
        self._multi = jax.process_count() > 1

    def __enter__(self):
        if not self._multi and threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, lambda *_: self._flag.set())
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
        return False

    def should_stop(self, step: int) -> bool:
        if self._multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service not running
                return False
        return self._flag.is_set()
