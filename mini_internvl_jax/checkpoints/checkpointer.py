"""The one writer of a training run's folder (layout and metadata: `checkpoints/run.py`).

Orbax writes each step into a temporary folder and renames it when complete, so a crash
mid-save never damages the checkpoints already there. Restores take abstract targets carrying
the current mesh's shardings, so a run saved on 8 devices resumes on 4.

A save that fails on a full, size-limited or read-only disk raises `CheckpointSaveError` (one
line naming the step folder), also when an async save fails in the background (`raise_if_failed`
is polled at every step boundary), and its temporary folder is removed; the steps saved before
stay, so the run can resume from the last of them.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Iterator

import grain
import orbax.checkpoint as ocp

from mini_internvl_jax.checkpoints.run import (
    DATA,
    META,
    PARAMS,
    TRAIN,
    CheckpointError,
    RunMeta,
    restore_items,
)
from mini_internvl_jax.errors import (
    chained_disk_error,
    first_line,
    quiet_storage_failures,
    silence_abandoned_reads,
)
from mini_internvl_jax.fileio import absolute_path, remove_settled


class CheckpointSaveError(CheckpointError):
    """A step could not be written (full, size-limited or read-only disk); earlier steps stay."""


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
        quiet_storage_failures()
        # cleanup_tmp_directories: a save cut short (a kill) leaves STEP.orbax-checkpoint-tmp
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                               enable_async_checkpointing=async_save,
                                               cleanup_tmp_directories=True)
        self.manager = ocp.CheckpointManager(self.directory, options=options)
        self._saving: int | None = None  # the step an async save may still be writing
        self._failed = False  # Orbax re-raises a failed save at every later wait
        self.last_saved = self.manager.latest_step()

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    @contextlib.contextmanager
    def _disk_errors(self) -> Iterator[None]:
        """A failed write of the pending step becomes CheckpointSaveError; its temporary
        folder is removed (Orbax leaves `STEP.orbax-checkpoint-tmp*` behind)."""
        try:
            yield
        except Exception as e:
            step, self._saving = self._saving, None
            line = chained_disk_error(e, where=str(self.directory / str(step)))
            if line is None or step is None:
                raise
            self._failed = True
            silence_abandoned_reads()
            with contextlib.suppress(Exception):  # let its writer threads end first
                self.manager.close()
            if "://" not in str(self.directory):
                for tmp in self.directory.glob(f"{step}.orbax-checkpoint-tmp*"):
                    remove_settled(tmp)
            last = (f"the last saved step, {self.last_saved}, is intact"
                    if self.last_saved is not None else "no step was saved before")
            raise CheckpointSaveError(f"checkpoint step {step} not saved: {line} ({last})") \
                from None

    def save(self, step: int, *, params, train: dict, iterator, meta: RunMeta) -> None:
        args = {PARAMS: ocp.args.StandardSave(params), TRAIN: ocp.args.StandardSave(train),
                META: ocp.args.JsonSave(meta.to_json())}
        if iterator is not None:
            args[DATA] = grain.checkpoint.CheckpointSave(_IteratorSnapshot(iterator))
        self.raise_if_failed()
        with self._disk_errors():
            self.manager.wait_until_finished()  # a failed earlier async save raises here
            self._finished()
            self._saving = step
            self.manager.save(step, args=ocp.args.Composite(**args), force=True)
            if not self.manager.is_saving_in_progress():
                self._finished()

    def _finished(self) -> None:
        if self._saving is not None:
            self.last_saved, self._saving = self._saving, None

    def raise_if_failed(self) -> None:
        """Raises CheckpointSaveError once an async save has failed; cheap while one runs."""
        if self._saving is None or self.manager.is_saving_in_progress():
            return
        with self._disk_errors():
            self.manager.wait_until_finished()
            self._finished()

    def restore(self, step: int, *, params, train=None, iterator=None) -> dict:
        """Restores `params` (and `train`, the iterator's position) onto the given targets."""
        args = {PARAMS: ocp.args.StandardRestore(params), META: ocp.args.JsonRestore()}
        if train is not None:
            args[TRAIN] = ocp.args.StandardRestore(train)
        if iterator is not None:
            args[DATA] = grain.checkpoint.CheckpointRestore(iterator)
        where = self.directory / str(step)
        out = restore_items(self.manager, step, args, lambda cause: (
            f"checkpoint {where} cannot be restored into this run (damaged, or a different "
            f"model, LoRA, trainable parameters or host count?): {cause}. To start a new run "
            "from its weights, use init_from instead of resuming."))
        out[META] = RunMeta.from_json(out[META], str(where))
        return out

    def restore_newest_intact(self, *, params, train=None, iterator=None
                              ) -> tuple[int, dict, str | None]:
        """(step, restored items, note) for the newest step that restores.

        A step folder that fails to restore while an older one succeeds is damaged (a disk
        error, a file truncated by hand): it is renamed `STEP.corrupt-TIME` (Orbax ignores
        it, and the run can save that step again) and `note` says which step was used and why.
        If no step restores, the newest step's error is raised: then the run itself does not
        match (a different model or host count), not the files.
        """
        steps = sorted(self.manager.all_steps(), reverse=True)
        errors: list[tuple[int, CheckpointError]] = []
        for step in steps:
            try:
                out = self.restore(step, params=params, train=train, iterator=iterator)
            except CheckpointError as e:
                errors.append((step, e))
                continue
            note = None
            if errors:
                moved = []
                for bad, _ in errors:
                    target = self.directory / f"{bad}.corrupt-{int(time.time())}"
                    (self.directory / str(bad)).rename(target)
                    moved.append(str(target))
                self.manager.reload()
                bad, error = errors[0]
                note = (f"checkpoint step {bad} in {self.directory} is unreadable "
                        f"({first_line(error.__cause__)}); resuming from step {step}, the newest "
                        f"intact one. Moved aside: {', '.join(moved)}")
            return step, out, note
        raise errors[0][1]

    def wait(self) -> None:
        if self._failed:
            return
        with self._disk_errors():
            self.manager.wait_until_finished()
            self._finished()

    def close(self) -> None:
        if self._failed:  # closed when the failure was reported
            return
        try:
            self.wait()
        finally:
            if not self._failed:
                self.manager.close()


def run_meta(cfg, model_cfg, step: int, *, data_fingerprint: str | None = None) -> RunMeta:
    """What a step folder records about its run (`run.read_run` reads it back)."""
    return RunMeta.of_run(cfg, model_cfg, step, data_fingerprint=data_fingerprint)
