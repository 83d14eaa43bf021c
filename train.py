"""Train Mini-InternVL: `python train.py --config PRESET_OR_YAML [key=value ...]`."""

import sys

from mini_internvl_jax.train import main

if __name__ == "__main__":
    sys.exit(main())
