"""Apply mapping rules to an in-memory state: the core used by the converter and the tests."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
from flax import nnx

from mini_internvl_jax.convert.errors import CheckpointMismatchError
from mini_internvl_jax.convert.mapping import Rule, target_key

__all__ = ["CheckpointMismatchError", "export_rules_from", "load_rules_into", "source_names",
           "torch_state_reader"]


def _flat_params(model_or_state) -> dict[tuple, nnx.Variable]:
    state = model_or_state if isinstance(model_or_state, nnx.State) else nnx.state(model_or_state)
    return {tuple(p): v for p, v in nnx.to_flat_state(state)}


def load_rules_into(model, rules: list[Rule], read: Callable[[str], np.ndarray], *,
                    scan: bool) -> None:
    """Fills `model`'s parameters from tensors returned by `read(name)`, rule by rule."""
    params = _flat_params(model)
    for rule in rules:
        arrays = []
        for name, shape in zip(rule.sources, rule.source_shapes, strict=True):
            a = read(name)
            if tuple(a.shape) != shape:
                raise CheckpointMismatchError(
                    f"tensor {name!r} has shape {tuple(a.shape)}, expected {shape}")
            arrays.append(a)
        for target, value in zip(rule.targets, rule.to_jax(arrays), strict=True):
            path, layer = target_key(target, scan)
            var = params.get(path)
            if var is None:
                raise CheckpointMismatchError(f"model has no parameter {'.'.join(map(str, path))}"
                                              f" (for tensor {rule.sources[0]!r})")
            current = var[...]
            expected = current.shape if layer is None else current.shape[1:]
            value = np.asarray(value)
            if value.shape != expected:
                raise CheckpointMismatchError(
                    f"tensor {rule.sources[0]!r} maps to parameter {'.'.join(map(str, path))} of "
                    f"shape {expected}, but gives {value.shape}")
            value = value.astype(current.dtype)
            var[...] = value if layer is None else current.at[layer].set(value)


def export_rules_from(model, rules: list[Rule], *, scan: bool) -> dict[str, np.ndarray]:
    """Inverse of `load_rules_into`: PyTorch-named numpy tensors from the model's parameters."""
    params = _flat_params(model)
    out: dict[str, np.ndarray] = {}
    for rule in rules:
        values = []
        for target in rule.targets:
            path, layer = target_key(target, scan)
            a = np.asarray(params[path][...])
            values.append(a if layer is None else a[layer])
        for name, a in zip(rule.sources, rule.to_hf(values), strict=True):
            out[name] = np.ascontiguousarray(a)
    return out


def source_names(rules: list[Rule]) -> list[str]:
    return [n for r in rules for n in r.sources]


def torch_state_reader(state_dict: Mapping) -> Callable[[str], np.ndarray]:
    """`read(name)` over a torch state_dict (float32 numpy copies)."""

    def read(name: str) -> np.ndarray:
        if name not in state_dict:
            raise CheckpointMismatchError(f"checkpoint is missing tensor {name!r}")
        return state_dict[name].detach().float().cpu().numpy()

    return read
