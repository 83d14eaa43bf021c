"""Shim for `mivl-convert` (mini_internvl_jax/cli/convert.py) run from a checkout."""
from mini_internvl_jax.cli.convert import main

if __name__ == "__main__":
    raise SystemExit(main())
