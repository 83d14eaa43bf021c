"""Sampling filters against transformers' logits warpers and hand-computed distributions."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers.generation import logits_process as lp

from mini_internvl_jax.infer.sampling import SamplingConfig, filter_logits, sample_logits


def hf_filter(logits: np.ndarray, cfg: SamplingConfig) -> np.ndarray:
    warpers = [lp.TemperatureLogitsWarper(cfg.temperature)]
    if cfg.top_k:
        warpers.append(lp.TopKLogitsWarper(cfg.top_k))
    if cfg.top_p < 1.0:
        warpers.append(lp.TopPLogitsWarper(cfg.top_p))
    x = torch.tensor(logits)
    for w in warpers:
        x = w(None, x)
    return x.numpy()


@pytest.mark.parametrize("cfg", [
    SamplingConfig(temperature=0.7),
    SamplingConfig(temperature=1.0, top_k=5),
    SamplingConfig(temperature=1.3, top_p=0.8),
    SamplingConfig(temperature=0.5, top_p=0.3),
    SamplingConfig(temperature=1.0, top_k=20, top_p=0.6),
    SamplingConfig(temperature=2.0, top_k=1),
])
def test_filters_match_transformers_warpers(cfg):
    logits = np.random.RandomState(0).randn(6, 50).astype(np.float32) * 3
    ours = np.asarray(filter_logits(jnp.asarray(logits), cfg))
    theirs = hf_filter(logits, cfg)
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(theirs))
    keep = ~np.isinf(theirs)
    np.testing.assert_allclose(ours[keep], theirs[keep], rtol=1e-6)


def test_top_p_keeps_smallest_prefix_reaching_mass():
    probs = np.array([[0.5, 0.3, 0.15, 0.05]])
    logits = jnp.asarray(np.log(probs), jnp.float32)
    for top_p, kept in [(0.5, 1), (0.51, 2), (0.79, 2), (0.81, 3), (0.96, 4), (0.01, 1)]:
        out = np.asarray(filter_logits(logits, SamplingConfig(temperature=1.0, top_p=top_p)))
        assert np.sum(np.isfinite(out)) == kept, (top_p, out)
        assert np.all(np.isfinite(out[0, :kept]))


def test_greedy_is_argmax_and_ignores_key():
    logits = jnp.asarray(np.random.RandomState(1).randn(4, 30), jnp.float32)
    expected = np.argmax(np.asarray(logits), axis=-1)
    for seed in (0, 1):
        got = sample_logits(logits, jax.random.key(seed), SamplingConfig())
        np.testing.assert_array_equal(np.asarray(got), expected)
        assert got.dtype == jnp.int32


def test_sampled_frequencies_follow_the_filtered_distribution():
    """Temperature 2 + top-k 3 on hand-made logits: frequencies match softmax(l/2) over top 3."""
    logits = np.array([2.0, 0.0, 1.0, -1.0, 3.0], np.float32)
    cfg = SamplingConfig(temperature=2.0, top_k=3)
    n = 20000
    draws = sample_logits(jnp.broadcast_to(jnp.asarray(logits), (n, 5)), jax.random.key(0), cfg)
    freq = np.bincount(np.asarray(draws), minlength=5) / n
    kept = np.array([True, False, True, False, True])
    expected = np.where(kept, np.exp(logits / 2), 0.0)
    expected /= expected.sum()
    np.testing.assert_allclose(freq, expected, atol=0.015)
    assert freq[1] == 0 and freq[3] == 0


@pytest.mark.parametrize("kw", [dict(temperature=-1.0), dict(top_k=-2), dict(top_p=0.0),
                                dict(top_p=1.5)])
def test_bad_settings_are_rejected(kw):
    with pytest.raises(ValueError, match="sampling"):
        SamplingConfig(**kw)
