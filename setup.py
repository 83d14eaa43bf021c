"""The package list, which pyproject.toml cannot spell: `find` sees only folders named like their
package, and the presets in configs/ (repository root) install as `mini_internvl_jax.configs`
([tool.setuptools.package-dir] in pyproject.toml). Everything else is in pyproject.toml."""

from setuptools import find_packages, setup

setup(packages=find_packages(include=["mini_internvl_jax*"]) + ["mini_internvl_jax.configs"])
