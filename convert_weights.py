#!/usr/bin/env python
"""Hugging Face PyTorch checkpoints <-> this project's Orbax folders (run with --help)."""

import os
import sys

# Conversion is pure host work: keep JAX off accelerators (and quiet) unless asked otherwise.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

from mini_internvl_jax.convert.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
