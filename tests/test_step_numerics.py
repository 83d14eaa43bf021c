"""The training step's numbers stay put while it is made faster.

RECORDED holds the losses of the first five float32 steps of tests/helpers/five_steps.py as
computed by the implementation before the speed work (commit 7237008, "Declare etils, ...":
per-layer weight casts inside the scanned layers, the recomputing chunked cross-entropy), run on
CPU with matmul precision "highest". Any later change of the step must reproduce them within
1e-5 relative.
"""

import numpy as np

from tests.helpers.five_steps import five_step_losses

RECORDED = [6.351090908050537, 6.318295001983643, 6.293505668640137, 6.357231616973877,
            6.246283531188965]


def test_first_five_float32_losses_match_the_previous_implementation():
    losses = five_step_losses()
    np.testing.assert_allclose(losses, RECORDED, rtol=1e-5)
    assert len(set(losses)) == 5  # the steps really train on different batches
