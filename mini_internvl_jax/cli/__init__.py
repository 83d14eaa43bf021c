"""The outer shell: every command-line entry point, the only layer that may import all others.

Each module has `main(argv=None) -> int` and runs as `python -m mini_internvl_jax.cli.NAME`;
pyproject's [project.scripts] installs them as mivl-train, mivl-convert, mivl-export, mivl-chat,
mivl-eval and mivl-demo-data. This package imports nothing heavy itself so `--help` stays fast.
"""
