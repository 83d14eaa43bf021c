"""Shim for `mivl-train` (mini_internvl_jax/cli/train.py) from a checkout: python train.py."""
from mini_internvl_jax.cli.train import main

if __name__ == "__main__":
    raise SystemExit(main())
