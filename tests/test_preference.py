"""MPO losses against trl's own `DPOTrainer.dpo_loss` and `RunningMoments` (the code InternVL's
MPO trainer calls), on the same per-sequence log-probs.

trl 1.x dropped `dpo_loss` and BCO's running reward shift, so the reference is trl 0.28.0 (the
last release with both; pinned in requirements-test.txt). Importing its trainer module pulls
accelerate, datasets and pandas (~15 s) and trips over transformers 5's tuple-returning
availability checks, so the two definitions are read from trl's installed source files and run
as they are (torch), on a stand-in `self` holding the attributes they read.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.metadata
import importlib.util
import math
from enum import Enum
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch

from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.train.preference import (
    PairLogps,
    PreferenceConfig,
    init_running,
    metric_sums,
    pair_losses,
)

F = torch.nn.functional


def _trl_defs():
    """trl's `DPOTrainer.dpo_loss` (a function of a stand-in self) and `RunningMoments`."""
    assert importlib.metadata.version("trl") == "0.28.0"
    spec = importlib.util.find_spec("trl")
    assert spec is not None and spec.submodule_search_locations
    root = Path(list(spec.submodule_search_locations)[0]) / "trainer"

    def source_of(file, cls, method=None):
        tree = ast.parse((root / file).read_text())
        node = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == cls)
        if method is not None:
            node = next(n for n in node.body if isinstance(n, ast.FunctionDef)
                        and n.name == method)
            node.decorator_list = []
        return ast.unparse(node)

    ns: dict = {"torch": torch, "F": F, "Enum": Enum, "dataclass": dataclasses.dataclass,
                "dataclasses": dataclasses, "Accelerator": object, "math": math}
    exec("from __future__ import annotations\n" + source_of("dpo_config.py", "FDivergenceType"),
         ns)
    exec(source_of("dpo_config.py", "FDivergenceConstants"), ns)
    exec(source_of("utils.py", "RunningMoments"), ns)
    exec(source_of("dpo_trainer.py", "DPOTrainer", "dpo_loss"), ns)
    return ns["dpo_loss"], ns["RunningMoments"], ns["FDivergenceType"]


class _Accel:
    device = "cpu"
    use_distributed = False


def _trl_stand_in(running_cls, fdiv, beta, label_smoothing):
    class Self:
        pass
    s = Self()
    s.accelerator, s.beta, s.label_smoothing = _Accel(), beta, label_smoothing
    s.reference_free, s.f_divergence_type, s.f_divergence_params = False, fdiv.REVERSE_KL, None
    s.running = running_cls(accelerator=_Accel())
    return s


def _mix_like_internvl(dpo_loss, me, cfg, pc, pr, rc, rr, nll):
    """InternVL's MultimodalDPOTrainer.get_batch_loss_metrics: the weighted mix + rpo_alpha."""
    losses, cr, rj = 0, 0, 0
    for t, w in zip(cfg.loss_types, cfg.loss_weights, strict=True):
        lo, c, r = dpo_loss(me, pc, pr, rc, rr, loss_type=t)
        losses, cr, rj = losses + lo * w, cr + c * w, rj + r * w
    if cfg.rpo_alpha is not None:
        losses = losses + nll * cfg.rpo_alpha
    return losses, cr, rj


@pytest.mark.parametrize("types,weights,ls,alpha", [
    (("sigmoid", "bco_pair"), (0.8, 0.2), 0.0, 1.0),  # InternVL3's MPO recipe
    (("sigmoid",), (1.0,), 0.1, None),
    (("bco_pair",), (1.0,), 0.0, None),
    (("ipo",), (1.0,), 0.0, 0.5),
    (("hinge", "sigmoid"), (0.3, 0.7), 0.0, None),
])
def test_losses_match_trl(types, weights, ls, alpha):
    dpo_loss, running_cls, fdiv = _trl_defs()
    cfg = PreferenceConfig(loss_types=types, loss_weights=weights, beta=0.1,
                           label_smoothing=ls, rpo_alpha=alpha)
    me = _trl_stand_in(running_cls, fdiv, cfg.beta, ls)
    rng = np.random.default_rng(0)
    running = init_running()
    for _ in range(3):  # three micro-batches: BCO's delta moves between them
        p = 5
        n_c = rng.integers(3, 40, p).astype(np.float32)
        n_r = rng.integers(3, 40, p).astype(np.float32)
        ref_c, ref_r = -n_c * rng.uniform(0.5, 2, p), -n_r * rng.uniform(0.5, 2, p)
        pc = (ref_c + rng.normal(0, 3, p)).astype(np.float32)
        pr = (ref_r + rng.normal(0, 3, p)).astype(np.float32)
        ref_c, ref_r = ref_c.astype(np.float32), ref_r.astype(np.float32)
        valid = np.array([True] * (p - 1) + [False])  # the last pair is padding
        lp = PairLogps(*(jnp.asarray(x) for x in (pc, pr, ref_c, ref_r, n_c, n_r, valid)))
        total, terms, running = pair_losses(cfg, lp, running)
        sums = metric_sums(terms, lp)

        v = valid
        args = [torch.from_numpy(x[v]) for x in (pc, pr, ref_c, ref_r)]
        if cfg.length_normalized:  # InternVL: all_logps / size_completion when loss_type == ipo
            lens = [torch.from_numpy(n[v]) for n in (n_c, n_r, n_c, n_r)]
            args = [a / n for a, n in zip(args, lens, strict=True)]
        nll = -torch.from_numpy(pc[v]) / torch.from_numpy(n_c[v])
        want, want_c, want_r = _mix_like_internvl(dpo_loss, me, cfg, *args, nll)
        np.testing.assert_allclose(np.asarray(total)[v], want.numpy(), rtol=1e-6, atol=1e-6)
        assert float(total[-1]) == 0.0
        np.testing.assert_allclose(np.asarray(terms["rewards_chosen"])[v], want_c.numpy(),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(np.asarray(terms["rewards_rejected"])[v], want_r.numpy(),
                                   rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(float(sums["rewards_accuracy"]),
                                   float((want_c > want_r).float().sum()))
        if "bco_pair" in types:
            np.testing.assert_allclose(float(running.mean), me.running.mean, rtol=1e-6, atol=1e-7)


def test_config_rejects_bad_mix():
    with pytest.raises(ConfigError, match="loss_weights"):
        PreferenceConfig(loss_types=("sigmoid", "bco_pair"), loss_weights=(1.0,))
    with pytest.raises(ConfigError, match="dpo"):
        PreferenceConfig(loss_types=("dpo",), loss_weights=(1.0,))
