"""Drop path (stochastic depth, InternViT's `DropPath`, timm semantics): per tile, a residual
branch is kept with probability 1 - rate and scaled by 1 / (1 - rate), so its expectation is
the unscaled branch. Checked statistically over 4000 keys (tolerances ~5 standard errors).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mini_internvl_jax.models.vision import _drop_path

N_KEYS = 4000


@pytest.mark.parametrize("rate", [0.1, 0.4])
def test_drop_path_expectation(rate):
    rng = np.random.default_rng(0)
    y = jnp.asarray(rng.uniform(0.5, 1.5, (8, 5, 4)), jnp.float32)  # [tiles, tokens, dim]
    keys = jax.random.split(jax.random.key(0), N_KEYS)
    out = np.asarray(jax.jit(jax.vmap(lambda k: _drop_path(y, (k, rate), 0)))(keys))
    kept = out != 0
    # one decision per tile (sample): a tile is kept or dropped as a whole
    assert np.all(kept.all(axis=(2, 3)) == kept.any(axis=(2, 3)))
    keep = kept[:, :, 0, 0]
    n = keep.size
    stderr = np.sqrt(rate * (1 - rate) / n)
    assert abs(keep.mean() - (1 - rate)) <= 5 * stderr, (keep.mean(), 1 - rate)
    # kept tiles are scaled by 1 / (1 - rate) ...
    np.testing.assert_allclose(out[kept], np.broadcast_to(y / (1 - rate), out.shape)[kept],
                               rtol=1e-6)
    # ... so the mean over keys is the unscaled branch
    mean = out.mean(axis=0)
    tol = 5 * np.sqrt(rate / (1 - rate) / N_KEYS)  # relative standard error of the mean
    assert np.max(np.abs(mean / np.asarray(y) - 1)) <= tol
    # independent draws for the two branches of a block (fold_in 0 / 1)
    other = np.asarray(jax.vmap(lambda k: _drop_path(y, (k, rate), 1))(keys))[:, :, 0, 0] != 0
    assert abs(np.mean(keep == other) - ((1 - rate) ** 2 + rate ** 2)) <= 5 * stderr + 0.01
