"""Stopping a run on SIGTERM / SIGINT: save at the next step boundary, but never hang.

The first signal sets a flag the training loop reads between steps; the loop then saves a
checkpoint and returns, and the CLI exits with `128 + signal number` (143 for SIGTERM, 130 for
Ctrl-C) so schedulers never mistake a preempted run for a finished one.

A flag alone cannot stop a run whose data pipeline or device is stalled (the loop never reaches
the next boundary; a Python signal handler does not even run while the main thread is inside
C code). So the signal numbers also reach a watchdog thread through `signal.set_wakeup_fd`, which
the interpreter writes from its C-level handler: a second signal, or `grace_s` seconds without a
step boundary, ends the process at once (same exit code, nothing saved; the last checkpoint on
disk stays intact because every save is atomic).

With several processes the stop decision must be the same everywhere; JAX's preemption sync
point (set up by jax.distributed, which handles SIGTERM itself) provides it, and no handler is
installed here.
"""

from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from collections.abc import Callable

import jax
from jax.experimental import multihost_utils

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code(signum: int) -> int:
    """The shell's convention for "ended by this signal": 143 = SIGTERM, 130 = SIGINT."""
    return 128 + int(signum)


class StopGuard:
    """Context manager around the step loop; `should_stop(step)` is called once per step."""

    def __init__(self, grace_s: float, last_checkpoint: Callable[[], str] = lambda: "none"):
        self.grace_s = grace_s
        self._last_checkpoint = last_checkpoint
        self.signum: int | None = None  # the first stop signal, once the loop has seen it
        self._multi = jax.process_count() > 1
        self._installed = False
        self._acknowledged = threading.Event()
        self._closing = threading.Event()

    def __enter__(self):
        if self._multi or threading.current_thread() is not threading.main_thread():
            return self
        self._rfd, self._wfd = os.pipe()
        os.set_blocking(self._wfd, False)
        self._old_wakeup = signal.set_wakeup_fd(self._wfd, warn_on_full_buffer=False)
        self._old = {s: signal.signal(s, self._on_signal) for s in STOP_SIGNALS}
        self._installed = True
        self._thread = threading.Thread(target=self._watch, name="stop-watchdog", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if not self._installed:
            return False
        for s, old in self._old.items():
            signal.signal(s, old)
        signal.set_wakeup_fd(self._old_wakeup)
        self._closing.set()
        os.write(self._wfd, b"\0")  # wakes the watchdog
        self._thread.join()
        os.close(self._rfd)
        os.close(self._wfd)
        return False

    def _on_signal(self, signum, frame) -> None:
        """Runs in the main thread whenever Python gets control; the watchdog does the rest."""
        if self.signum is None:
            self.signum = signum

    def _say(self, text: str) -> None:
        sys.stderr.write(text + "\n")
        sys.stderr.flush()

    def _watch(self) -> None:
        first: int | None = None
        deadline: float | None = None
        while True:
            if deadline is not None and self._acknowledged.is_set():
                deadline = None  # the loop is saving: no deadline, a second signal still works
            timeout = None if deadline is None else max(0.0, deadline - time.monotonic())
            ready, _, _ = select.select([self._rfd], [], [], timeout)
            if self._closing.is_set():
                return
            if not ready:
                if self._acknowledged.is_set():
                    deadline = None
                    continue
                assert first is not None  # a deadline runs only after the first signal
                self._say(f"no step boundary within {self.grace_s:g} s of "
                          f"{signal.Signals(first).name}: exiting now without saving (last "
                          f"checkpoint: {self._last_checkpoint()})")
                os._exit(exit_code(first))
            for signum in os.read(self._rfd, 64):
                if signum not in STOP_SIGNALS:
                    continue
                if first is None:
                    first, deadline = signum, time.monotonic() + self.grace_s
                    self._say(f"{signal.Signals(signum).name} received: saving a checkpoint at "
                              f"the end of this step (send it again to stop at once without "
                              f"saving; forced exit in {self.grace_s:g} s if no step ends)")
                else:
                    self._say(f"second stop signal ({signal.Signals(signum).name}): exiting "
                              f"now without saving (last checkpoint: {self._last_checkpoint()})")
                    os._exit(exit_code(first))

    def should_stop(self, step: int) -> bool:
        if self._multi:
            try:
                return multihost_utils.reached_preemption_sync_point(step)
            except RuntimeError:  # preemption service not running
                return False
        if self.signum is not None:
            self._acknowledged.set()
            return True
        return False
