"""Mapping rules applied tensor by tensor: the core of the converter's import (the tests fill
live models from torch state_dicts with it too, tests/helpers/torch_rules.py)."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np

from mini_internvl_jax.convert.errors import CheckpointMismatchError
from mini_internvl_jax.convert.hf_io import copy_into
from mini_internvl_jax.convert.mapping import Rule, target_key
from mini_internvl_jax.convert.params import path_str

Read = Callable[[str], np.ndarray]


def fill_from_rules(rules: list[Rule], read: Read, specs: Mapping, *, scan: bool,
                    out: dict[tuple, np.ndarray] | None = None) -> dict[tuple, np.ndarray]:
    """Host arrays for `specs` (path -> anything with .shape/.dtype), filled rule by rule.

    Each rule's tensors come from `read(name)` and are dropped once copied, so the extra memory
    is one rule's tensors. Arrays missing from `out` are allocated on first use; a tensor of the
    wrong shape or a target `specs` lacks is a CheckpointMismatchError naming the tensor.
    """
    out = {} if out is None else out
    for rule in rules:
        arrays = []
        for name, shape in zip(rule.sources, rule.source_shapes, strict=True):
            arrays.append(read(name))
            if tuple(arrays[-1].shape) != shape:
                raise CheckpointMismatchError(
                    f"tensor {name!r} has shape {tuple(arrays[-1].shape)}, expected {shape}")
        for target, value in zip(rule.targets, rule.to_jax(arrays), strict=True):
            path, layer = target_key(target, scan)
            if path not in specs:
                raise CheckpointMismatchError(f"model has no parameter {path_str(path)} (for "
                                              f"tensor {rule.sources[0]!r})")
            shape = tuple(specs[path].shape)
            expected = shape if layer is None else shape[1:]
            value = np.asarray(value)
            if value.shape != expected:
                raise CheckpointMismatchError(
                    f"tensor {rule.sources[0]!r} maps to parameter {path_str(path)} of shape "
                    f"{expected}, but gives {value.shape}")
            if path not in out:
                out[path] = np.empty(shape, specs[path].dtype)
            copy_into(out[path] if layer is None else out[path][layer], value)
        del arrays
    return out
