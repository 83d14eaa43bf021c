"""Shared test helpers: reference models and checkpoints built independently of the package."""
