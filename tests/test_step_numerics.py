"""The training step's numbers stay put while it is made faster.

RECORDED holds the losses of the first five float32 steps of tests/helpers/five_steps.py as
computed by the implementation before the speed work (commit 7237008, "Declare etils, ...":
per-layer weight casts inside the scanned layers, the recomputing chunked cross-entropy), run on
CPU with matmul precision "highest". Any later change of the step must reproduce them within
1e-5 relative.
"""

import jax
import numpy as np
import pytest

from mini_internvl_jax.train.step import jit_step, make_step_fn
from tests.helpers.five_steps import five_step_losses, tiny_setup

RECORDED = [6.351090908050537, 6.318295001983643, 6.293505668640137, 6.357231616973877,
            6.246283531188965]


@pytest.mark.parametrize("remat, remat_vision", [
    ("full", None), ("save_attention", "save_dots"),
    pytest.param("save_dots", None, marks=pytest.mark.slow)])  # suite time: same step code
def test_first_five_float32_losses_match_the_previous_implementation(remat, remat_vision):
    """Also under the policies `remat: auto` picks from (save_dots for 1B at W1, the LLM keeping
    only attention results while the ViT keeps its matmul outputs for 2B): what a policy keeps
    or recomputes must not change a number."""
    losses = five_step_losses(compute={"remat": remat, "remat_vision": remat_vision})
    np.testing.assert_allclose(losses, RECORDED, rtol=1e-5)
    assert len(set(losses)) == 5  # the steps really train on different batches


@pytest.mark.slow  # two bf16 steps compiled twice; the cast-once step itself runs in every
# training test and its TPU compile in test_step_anatomy's tiny-step tests
def test_casting_kernels_once_per_step_changes_no_bfloat16_number():
    """The step casts Dense kernels to bfloat16 once, before the layer loops; the layers used
    to cast them at every use. Both must give the same parameters after two bf16 steps."""
    s, mesh, batch = tiny_setup(compute={"dtype": "bfloat16"})
    per_use = jit_step(
        make_step_fn(s.graphdef, s.tx, s.schedule, loss_chunk=s.cfg.loss_chunk,
                     drop_path=False, lora_dropout=False, compute_dtype=None),
        mesh, s.state_sh, s.batch_sh)
    results = []
    with jax.set_mesh(mesh):
        for fn in (s.step_fn, per_use):
            state = jax.tree.map(lambda x: x.copy(), s.state)  # the step donates its state
            for step in range(2):
                state, m = fn(state, batch(step))
            results.append((jax.tree.leaves(state.params), float(m["loss"])))
    (once, loss_once), (every_use, loss_every_use) = results
    assert loss_once == loss_every_use
    for a, b in zip(once, every_use, strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
