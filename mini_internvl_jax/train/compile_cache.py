"""JAX's persistent compilation cache for a training run, and counts of its hits.

A restart after preemption otherwise recompiles the whole training step (minutes for the real
models); with the cache under the run folder, a restarted job reads the executables compiled by
the previous start. JAX skips programs that compile in under a second or are small by default;
both thresholds are set to 0 here so every program of the run is cached (the tiny CPU models of
the tests included).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import jax
from jax.experimental.compilation_cache import compilation_cache

from mini_internvl_jax.train.config import TrainConfig

_HIT = "/jax/compilation_cache/cache_hits"
_MISS = "/jax/compilation_cache/cache_misses"
_SETTINGS = {"jax_persistent_cache_min_compile_time_secs": 0.0,
             "jax_persistent_cache_min_entry_size_bytes": 0}


def _setting(name: str) -> Any:
    return getattr(jax.config, name)


def cache_dir(cfg: TrainConfig) -> str | None:
    """`compile_cache_dir`; "auto" = a cache JAX is already set to use (JAX_COMPILATION_CACHE_DIR,
    shared by many runs), else `compile_cache` in the run folder (checkpoint.dir, else
    log.dir), none without one; None = off."""
    if cfg.compile_cache_dir != "auto":
        return cfg.compile_cache_dir
    if _setting("jax_compilation_cache_dir"):
        return _setting("jax_compilation_cache_dir")
    run_dir = cfg.checkpoint.dir or cfg.log.dir
    if run_dir is None:
        return None
    return run_dir.rstrip("/") + "/compile_cache"  # a local folder or gs://...


@dataclass
class CacheStats:
    dir: str | None = None
    hits: int = 0
    misses: int = 0  # programs compiled and written to the cache

    def describe(self) -> str:
        if self.dir is None:
            return "compile cache off"
        return f"compile cache {self.dir}: {self.hits} hit(s), {self.misses} compiled"


@contextlib.contextmanager
def persistent_cache(path: str | None) -> Iterator[CacheStats]:
    """Compiles inside use the cache at `path` (None: off, counts stay 0); JAX's previous cache
    settings are restored on exit, so one process can run several runs (tests)."""
    stats = CacheStats(path)
    if path is None:
        yield stats
        return
    names = ["jax_compilation_cache_dir", *_SETTINGS]
    old = {name: _setting(name) for name in names}

    def listen(event: str, **_kwargs) -> None:
        if event == _HIT:
            stats.hits += 1
        elif event == _MISS:
            stats.misses += 1

    # JAX decides once per process whether the cache is used; reset so the new dir counts.
    compilation_cache.reset_cache()
    jax.config.update("jax_compilation_cache_dir", path)
    for name, value in _SETTINGS.items():
        jax.config.update(name, value)
    jax.monitoring.register_event_listener(listen)
    try:
        yield stats
    finally:
        jax.monitoring.unregister_event_listener(listen)
        for name, value in old.items():
            jax.config.update(name, value)
        compilation_cache.reset_cache()
