"""Test-wide setup: 8 fake CPU devices, CPU only, absl flags parsed (for grain workers), and
one persistent JAX compilation cache for the session (xdist workers and the training
subprocesses inherit it), so a step compiled by one test is read back by the next."""

import os
import shutil
import tempfile

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

from absl import flags  # noqa: E402

flags.FLAGS.mark_as_parsed()

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

_CACHE = pytest.StashKey[str]()


def pytest_configure(config):
    if "JAX_COMPILATION_CACHE_DIR" in os.environ:  # set by the controller or by the user
        return
    cache = tempfile.mkdtemp(prefix="mivl-test-jax-cache-")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = cache
    jax.config.update("jax_compilation_cache_dir", cache)
    config.stash[_CACHE] = cache


def pytest_unconfigure(config):
    cache = config.stash.get(_CACHE, None)
    if cache is not None:
        shutil.rmtree(cache, ignore_errors=True)

