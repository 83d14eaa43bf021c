"""A stack of identical layers, run as a Python loop or as one `lax.scan` over stacked weights.

Scanning compiles one layer instead of N (big compile-time win on TPU pods); the loop is easier
to debug. Both run the layer through the same pure function, so remat applies identically.
Parameters of a scanned stack carry a leading `layers` axis.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
from flax import nnx

from mini_internvl_jax.kernels.common import RESIDUAL_NAMES

# Named scopes around the model's parts, the loss and the optimizer update. They only name
# things (the compiled program is the same); tools/hlo.py sorts a compiled step's kernels into
# parts by them (its op_name metadata reads e.g. `transpose(jvp(vision_tower))/while/...`).
SCOPE_VISION = "vision_tower"  # InternViT and the projector
SCOPE_LLM = "llm_layers"  # the decoder layers and the final norm
SCOPE_EMBED = "embedding"  # token embedding and the image-feature splice
SCOPE_HEAD = "lm_head_loss"  # LM head and cross-entropy
SCOPE_OPTIMIZER = "optimizer_update"  # gradient norm, clipping, AdamW, the finite-step guard
SCOPE_CAST = "weight_cast"  # the per-step compute-dtype copy of the weights

_save_attention = jax.checkpoint_policies.save_only_these_names(*RESIDUAL_NAMES)

# jax.checkpoint policy per `remat` setting (the config's remat choices), from the most memory
# to the least. The flash kernels' output and logsumexp are named (kernels/common.py): a Pallas
# call is no dot, so without its residuals saved the backward would run the forward kernel again.
CHECKPOINT_POLICIES = {
    "none": None,
    # Keep matmul outputs (projections) and the attention kernel's results; recompute
    # elementwise work (norms, activations, residual adds).
    "save_dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable, _save_attention),
    # Keep only the attention kernel's results (one [tokens, heads * head_dim] array and a
    # float32 row per head and layer); recompute the rest.
    "save_attention": _save_attention,
    "full": jax.checkpoint_policies.nothing_saveable,
}


class LayerStack(nnx.Module):
    def __init__(self, make_layer: Callable[[nnx.Rngs], nnx.Module], num_layers: int, *,
                 scan: bool, rngs: nnx.Rngs):
        self.num_layers = num_layers
        self.scan = scan
        if scan:
            @nnx.split_rngs(splits=num_layers)
            @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
            def make_all(r):
                return make_layer(r)

            self.layers = make_all(rngs)
        else:
            self.layers = nnx.List([make_layer(rngs) for _ in range(num_layers)])

    def __call__(self, x, per_layer=None, *, remat: str = "none", num_layers: int | None = None,
                 **kwargs):
        """Runs the first `num_layers` layers (default all).

        Each layer is called as `layer(x, per_layer_slice, **kwargs) -> (x, out_slice)`; x is
        the loop state (any pytree: the decoder carries (hidden, KV cache)), `per_layer` a
        pytree with a leading layer axis (or None); the stacked outputs are returned alongside
        x.
        """
        n = self.num_layers if num_layers is None else num_layers
        if remat not in CHECKPOINT_POLICIES:
            hint = " (the trainer resolves auto before the model runs)" if remat == "auto" else ""
            raise ValueError(f"remat {remat!r} is not one of {list(CHECKPOINT_POLICIES)}{hint}")

        def apply(graphdef, state, h, xs):
            return nnx.merge(graphdef, state)(h, xs, **kwargs)

        if remat != "none":
            apply = jax.checkpoint(apply, policy=CHECKPOINT_POLICIES[remat], static_argnums=(0,))

        if self.scan:
            graphdef, state = nnx.split(self.layers)
            if n != self.num_layers:
                state = jax.tree.map(lambda a: a[:n], state)
            per = None if per_layer is None else jax.tree.map(lambda a: a[:n], per_layer)

            def body(h, xs):
                layer_state, layer_in = xs
                return apply(graphdef, layer_state, h, layer_in)

            return jax.lax.scan(body, x, (state, per))

        outs = []
        for i in range(n):
            graphdef, state = nnx.split(self.layers[i])
            xs = None if per_layer is None else jax.tree.map(lambda a, i=i: a[i], per_layer)
            x, out = apply(graphdef, state, x, xs)
            outs.append(out)
        if outs and outs[0] is not None:
            stacked = jax.tree.map(lambda *a: jax.numpy.stack(a), *outs)
        else:
            stacked = None
        return x, stacked
