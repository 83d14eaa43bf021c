"""Hugging Face PyTorch checkpoints <-> our parameter tree (mapping) and Orbax (converter)."""
