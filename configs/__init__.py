"""Bundled presets (package data): `models/` model presets, `train/` training presets."""
