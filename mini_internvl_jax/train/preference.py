"""Preference losses of Mixed Preference Optimization (InternVL's MPO stage), per pair.

InternVL trains its released models past SFT with trl's `DPOTrainer.dpo_loss` under a weighted
mix (`--loss_type sigmoid,bco_pair --sigmoid_loss_weight 0.8 --bco_pair_loss_weight 0.2
--rpo_alpha 1`): per pair, `sum_k w_k * loss_k + rpo_alpha * nll(chosen)`, averaged over the
pairs. Everything here works on per-sequence log-probs (sums of token log-probs of the answer),
so it is the same for packed and unpacked rows:

  logits   = (pc - pr) - (rc - rr)                 p: policy, r: reference, c/r: chosen/rejected
  sigmoid  = -(1-ls) logsig(b logits) - ls logsig(-b logits)      (DPO, label smoothing ls)
  hinge    = relu(1 - b logits)                                   (SLiC)
  ipo      = (logits - 1/(2b))^2                                  (IPO)
  bco_pair = -logsig(b (pc-rc) - delta) - logsig(-(b (pr-rr) - delta))   (BCO)

BCO's reward shift `delta` is trl's `RunningMoments.mean`: the running mean of one number per
micro-batch (the mean of all chosen and rejected rewards in it, detached), updated before the
micro-batch's loss uses it. It is training state (`RunningMean`), carried from step to step and
checkpointed, so a resumed run continues with the same delta.

As in InternVL's trainer: IPO alone (loss_types == ("ipo",)) uses per-token averaged log-probs
for everything (its rewards included); in a mix it does not. Rewards are `b * (p - r)` weighted
by the sum of the loss weights, as the original sums each type's rewards times its weight. The
SFT term is the chosen answer's mean token negative log-likelihood; the recipe trains one pair
per device, so it is normalised per pair (independent of how pairs are packed).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import jax
import jax.numpy as jnp

from mini_internvl_jax.configlib import check

LOSS_TYPES = ("sigmoid", "bco_pair", "ipo", "hinge")


@dataclass(frozen=True)
class PreferenceConfig:
    """MPO loss settings; the defaults are InternVL3's MPO recipe (internvl3_1b_mpo.sh)."""

    loss_types: tuple[str, ...] = ("sigmoid", "bco_pair")
    loss_weights: tuple[float, ...] = (0.8, 0.2)
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float | None = 1.0  # weight of the SFT term on `chosen`; null = none
    # Where the reference log-probs come from: a frozen copy of the initial model whose forward
    # runs inside the step ("model"), or a first pass stored beside the data ("precomputed").
    reference: str = "model"
    # Where precomputed reference log-probs are stored (JSON); null = ref_logps.json beside
    # data.meta_path. Computed by a first pass when missing.
    ref_logps_path: str | None = None

    def __post_init__(self):
        check(len(self.loss_types) > 0, "preference.loss_types", "must name at least one loss")
        for t in self.loss_types:
            check(t in LOSS_TYPES, "preference.loss_types", f"{t!r} is not one of {LOSS_TYPES}")
        check(len(set(self.loss_types)) == len(self.loss_types), "preference.loss_types",
              "must not repeat a loss")
        check(len(self.loss_weights) == len(self.loss_types), "preference.loss_weights",
              f"needs one weight per loss type ({len(self.loss_types)})")
        check(self.beta > 0, "preference.beta", "must be > 0")
        check(0.0 <= self.label_smoothing < 0.5, "preference.label_smoothing",
              "must be in [0, 0.5)")
        check(self.rpo_alpha is None or self.rpo_alpha >= 0, "preference.rpo_alpha",
              "must be >= 0 or null")
        check(self.reference in ("model", "precomputed"), "preference.reference",
              "must be 'model' or 'precomputed'")

    @property
    def length_normalized(self) -> bool:
        """IPO alone divides every log-prob by its answer length (InternVL's trainer)."""
        return self.loss_types == ("ipo",)


class RunningMean(NamedTuple):
    """trl's RunningMoments restricted to what BCO reads (the mean); float32 scalars."""

    mean: jax.Array
    n: jax.Array  # values seen (trl's `count`)


def init_running() -> RunningMean:
    # trl starts count at 1e-24 so the first update sets the mean to the first value.
    return RunningMean(jnp.zeros((), jnp.float32), jnp.full((), 1e-24, jnp.float32))


def update_running(run: RunningMean, x: jax.Array) -> RunningMean:
    """One update with a single value (what trl does with the micro-batch's mean reward)."""
    total = run.n + 1.0
    return RunningMean(run.mean + (x - run.mean) / total, total)


class PairLogps(NamedTuple):
    """Per-pair sums of answer-token log-probs [P] and answer lengths [P]; `valid` [P] marks
    real pairs (padding pairs count for nothing)."""

    chosen: jax.Array
    rejected: jax.Array
    ref_chosen: jax.Array
    ref_rejected: jax.Array
    chosen_tokens: jax.Array
    rejected_tokens: jax.Array
    valid: jax.Array


def pair_losses(cfg: PreferenceConfig, lp: PairLogps, running: RunningMean
                ) -> tuple[jax.Array, dict[str, jax.Array], RunningMean]:
    """(per-pair total loss [P], per-pair terms {name: [P]}, the updated running mean).

    Padding pairs get loss 0 and do not move the running mean. Differentiable in the policy
    log-probs; the reference log-probs and delta are treated as constants.
    """
    valid = lp.valid.astype(jnp.float32)
    n_c = jnp.maximum(lp.chosen_tokens.astype(jnp.float32), 1.0)
    n_r = jnp.maximum(lp.rejected_tokens.astype(jnp.float32), 1.0)
    pc, pr = lp.chosen, lp.rejected
    rc, rr = jax.lax.stop_gradient(lp.ref_chosen), jax.lax.stop_gradient(lp.ref_rejected)
    nll = -pc / n_c  # before any length normalisation: the SFT term is always a token mean
    if cfg.length_normalized:
        pc, pr, rc, rr = pc / n_c, pr / n_r, rc / n_c, rr / n_r
    b = cfg.beta
    logits = (pc - pr) - (rc - rr)
    chosen_r, rejected_r = b * (pc - rc), b * (pr - rr)
    terms: dict[str, jax.Array] = {}
    new_running = running
    for t in cfg.loss_types:
        if t == "sigmoid":
            ls = cfg.label_smoothing
            terms[t] = (-jax.nn.log_sigmoid(b * logits) * (1 - ls)
                        - jax.nn.log_sigmoid(-b * logits) * ls)
        elif t == "hinge":
            terms[t] = jax.nn.relu(1 - b * logits)
        elif t == "ipo":
            terms[t] = (logits - 1 / (2 * b)) ** 2
        elif t == "bco_pair":
            n = jnp.maximum(jnp.sum(valid), 1.0)
            batch_reward = jax.lax.stop_gradient(
                jnp.sum((chosen_r + rejected_r) * valid) / (2 * n))
            new_running = jax.lax.cond(jnp.sum(valid) > 0, update_running,
                                       lambda r, _: r, running, batch_reward)
            delta = new_running.mean
            terms[t] = (-jax.nn.log_sigmoid(chosen_r - delta)
                        - jax.nn.log_sigmoid(-(rejected_r - delta)))
    total = sum(w * terms[t] for t, w in zip(cfg.loss_types, cfg.loss_weights, strict=True))
    if cfg.rpo_alpha is not None:
        terms["nll"] = nll
        total = total + cfg.rpo_alpha * nll
    w_sum = sum(cfg.loss_weights)
    terms["rewards_chosen"] = jax.lax.stop_gradient(chosen_r * w_sum)
    terms["rewards_rejected"] = jax.lax.stop_gradient(rejected_r * w_sum)
    masked = {k: jnp.where(lp.valid, v, 0.0) for k, v in terms.items()}
    return jnp.where(lp.valid, total, 0.0), masked, new_running


def metric_sums(terms: dict[str, jax.Array], lp: PairLogps) -> dict[str, jax.Array]:
    """Sums over the pairs of what the logs show as means (divide by `pairs`)."""
    valid = lp.valid.astype(jnp.float32)
    rc, rr = terms["rewards_chosen"], terms["rewards_rejected"]
    out = {f"loss_{k}": jnp.sum(v) for k, v in terms.items() if not k.startswith("rewards")}
    out.update({
        "pairs": jnp.sum(valid),
        "rewards_chosen": jnp.sum(rc), "rewards_rejected": jnp.sum(rr),
        "rewards_margin": jnp.sum(rc - rr),
        "rewards_accuracy": jnp.sum(jnp.where(lp.valid, (rc > rr).astype(jnp.float32), 0.0)),
        "logps_chosen": jnp.sum(jax.lax.stop_gradient(lp.chosen) * valid),
        "logps_rejected": jnp.sum(jax.lax.stop_gradient(lp.rejected) * valid),
    })
    return out
