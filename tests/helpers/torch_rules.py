"""Test-only: a live model filled from a torch state_dict through the converter's mapping rules
(`convert.apply.fill_from_rules`), for the parity tests."""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
from flax import nnx

from mini_internvl_jax.convert.apply import Read, fill_from_rules
from mini_internvl_jax.convert.errors import CheckpointMismatchError
from mini_internvl_jax.convert.mapping import Rule


def load_rules_into(model, rules: list[Rule], read: Read, *, scan: bool) -> None:
    """Fills `model`'s parameters in place from `read(name)` (parameters no rule names keep
    their values)."""
    params = {tuple(p): v for p, v in nnx.to_flat_state(nnx.state(model))}
    current = {p: np.array(v[...]) for p, v in params.items()}
    for path, value in fill_from_rules(rules, read, current, scan=scan, out=current).items():
        params[path][...] = value


def torch_state_reader(state_dict: Mapping) -> Read:
    """`read(name)` over a torch state_dict (float32 numpy copies)."""

    def read(name: str) -> np.ndarray:
        if name not in state_dict:
            raise CheckpointMismatchError(f"checkpoint is missing tensor {name!r}")
        return state_dict[name].detach().float().cpu().numpy()

    return read
