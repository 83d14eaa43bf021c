"""The package version, in one place (pyproject.toml reads it; converted folders record it)."""

__version__ = "0.1.0"
