"""InternVL glue: vision features -> pixel shuffle -> `mlp1` projector -> splice into the LLM.

The splice is order-based and static-shape: the real tiles of the batch's tile buffer (flag 1),
in buffer order, fill the `<IMG_CONTEXT>` positions of `input_ids` in row-major order across the
batch; padding tiles (flag 0) are skipped. A count mismatch is an error, also under jit.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from mini_internvl_jax.batch import Batch
from mini_internvl_jax.config import ComputeConfig, ModelConfig
from mini_internvl_jax.models.layers import Dense, LayerNorm, gelu
from mini_internvl_jax.models.llm import Decoder, ModelOutput
from mini_internvl_jax.models.stack import SCOPE_EMBED, SCOPE_LLM, SCOPE_VISION
from mini_internvl_jax.models.vision import InternViT
from mini_internvl_jax.sharding import shard_activation


class ImageTokenMismatchError(ValueError):
    """The number of `<IMG_CONTEXT>` tokens differs from what the real tiles produce."""


def pixel_shuffle(x: jax.Array, scale: int, version: str = "v2") -> jax.Array:
    """[N, H, W, C] -> [N, (H/s)*(W/s), s*s*C]; channels ordered (dy, dx, c).

    v2 lists output tokens row-major; v1 (old checkpoints) column-major.
    """
    n, h, w, c = x.shape
    if h % scale or w % scale:
        raise ValueError(f"pixel_shuffle: grid {h}x{w} is not divisible by {scale}")
    x = x.reshape(n, h // scale, scale, w // scale, scale, c)
    order = (0, 1, 3, 2, 4, 5) if version == "v2" else (0, 3, 1, 2, 4, 5)
    return x.transpose(order).reshape(n, (h // scale) * (w // scale), scale * scale * c)


class Projector(nnx.Module):
    """`mlp1`: LayerNorm(eps 1e-5) -> Linear -> GELU -> Linear."""

    def __init__(self, in_dim: int, out_dim: int, eps: float, *, dtype, param_dtype,
                 rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm = LayerNorm(in_dim, eps, ("proj_in",), param_dtype=param_dtype, rngs=rngs)
        self.fc1 = Dense((in_dim,), (out_dim,), ("proj_in", "proj_out"), use_bias=True, **kw)
        self.fc2 = Dense((out_dim,), (out_dim,), ("proj_out", "embed"), use_bias=True, **kw)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.fc2(gelu(self.fc1(self.norm(x))))


def _raise_on_mismatch(n_text, n_vision, n_tiles, per_tile):
    if int(n_text) != int(n_vision):
        raise ImageTokenMismatchError(
            f"the batch has {int(n_text)} <IMG_CONTEXT> tokens but {int(n_tiles)} real tiles x "
            f"{per_tile} tokens = {int(n_vision)} image tokens; every real tile needs exactly "
            f"{per_tile} placeholders (check the template expansion and image_flags)")


def check_image_token_count(n_text, n_vision, n_tiles, per_tile) -> None:
    """Host-side check when the counts are concrete, a host callback when traced."""
    if all(not isinstance(v, jax.core.Tracer) for v in (n_text, n_vision, n_tiles)):
        _raise_on_mismatch(n_text, n_vision, n_tiles, per_tile)
    else:
        jax.debug.callback(_raise_on_mismatch, n_text, n_vision, n_tiles, per_tile)


def splice_image_embeddings(text_embeds: jax.Array, input_ids: jax.Array,
                            image_embeds: jax.Array, image_flags: jax.Array,
                            image_token_id: int, *, check: bool = True) -> jax.Array:
    """text_embeds [B, S, D]; image_embeds [T, N, D]; image_flags [T] -> [B, S, D]."""
    b, s, d = text_embeds.shape
    t, n, _ = image_embeds.shape
    flat_vision = image_embeds.reshape(t * n, d)
    valid = jnp.repeat(image_flags.astype(bool), n)
    # source row of the j-th real vision token
    src = jnp.nonzero(valid, size=t * n, fill_value=0)[0]
    is_img = (input_ids == image_token_id).reshape(-1)
    if check:
        check_image_token_count(jnp.sum(is_img), jnp.sum(valid),
                                jnp.sum(image_flags.astype(bool)), n)
    j = jnp.clip(jnp.cumsum(is_img) - 1, 0, t * n - 1)
    gathered = jnp.take(flat_vision, src[j], axis=0).astype(text_embeds.dtype)
    out = jnp.where(is_img[:, None], gathered, text_embeds.reshape(b * s, d))
    return out.reshape(b, s, d)


def default_positions(input_ids: jax.Array, segment_ids: jax.Array | None) -> jax.Array:
    """0..S-1, or restarting at every segment change when segment ids are given."""
    b, s = input_ids.shape
    idx = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32), (b, s))
    if segment_ids is None:
        return idx
    starts = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
                             axis=1)
    start_idx = jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)
    return idx - start_idx


class InternVLModel(nnx.Module):
    """`cfg` is what the weights are; `compute` how this instance runs them (dtypes, attention
    kernel, layer scan, remat, in-graph checks)."""

    def __init__(self, cfg: ModelConfig, compute: ComputeConfig | None = None, *,
                 rngs: nnx.Rngs):
        compute = ComputeConfig() if compute is None else compute
        self.cfg, self.compute = cfg, compute
        dtype = jnp.dtype(compute.dtype)
        param_dtype = jnp.dtype(compute.param_dtype)
        self.vision = InternViT(cfg.vision, dtype=dtype, param_dtype=param_dtype,
                                attention_impl=compute.attention_impl,
                                scan_layers=compute.scan_layers, rngs=rngs)
        self.projector = Projector(cfg.projector_in_dim, cfg.llm.hidden_size,
                                   cfg.projector_norm_eps, dtype=dtype, param_dtype=param_dtype,
                                   rngs=rngs)
        self.llm = Decoder(cfg.llm, dtype=dtype, param_dtype=param_dtype,
                           attention_impl=compute.attention_impl,
                           scan_layers=compute.scan_layers, rngs=rngs)

    def image_features(self, pixel_values: jax.Array, *, dropout_key=None) -> jax.Array:
        """[T, C, H, W] -> [T, num_image_tokens, llm hidden]."""
        cfg = self.cfg
        with jax.named_scope(SCOPE_VISION):
            h = self.vision(pixel_values, num_layers=cfg.num_vision_layers_used,
                            dropout_key=dropout_key, remat=self.compute.vision_remat)
            h = h[:, 1:]  # drop CLS
            t, n, c = h.shape
            side = int(round(np.sqrt(n)))
            h = pixel_shuffle(h.reshape(t, side, side, c), cfg.shuffle_scale, cfg.ps_version)
            out = self.projector(h)
            return shard_activation(out, ("tiles", "length", "act_embed"))

    def embed(self, input_ids: jax.Array, pixel_values: jax.Array | None = None,
              image_flags: jax.Array | None = None, *, dropout_key=None) -> jax.Array:
        with jax.named_scope(SCOPE_EMBED):
            x = self.llm.embed(input_ids)
        if pixel_values is None:
            if self.compute.check_image_tokens:
                check_image_token_count(jnp.sum(input_ids == self.cfg.image_token_id),
                                        jnp.int32(0), jnp.int32(0), self.cfg.num_image_tokens)
            return x
        if image_flags is None:
            image_flags = jnp.ones((pixel_values.shape[0],), jnp.int32)
        feats = self.image_features(pixel_values, dropout_key=dropout_key)
        with jax.named_scope(SCOPE_EMBED):
            return splice_image_embeddings(x, input_ids, feats, image_flags,
                                           self.cfg.image_token_id,
                                           check=self.compute.check_image_tokens)

    def hidden_states(self, input_ids, pixel_values=None, image_flags=None, positions=None,
                      segment_ids=None, *, dropout_key=None, cache=None) -> ModelOutput:
        """Final-normed LLM hidden states [B, S, D] and the updated cache (if one is given)."""
        if positions is None:
            positions = default_positions(input_ids, segment_ids)
        x = self.embed(input_ids, pixel_values, image_flags, dropout_key=dropout_key)
        with jax.named_scope(SCOPE_LLM):
            return self.llm(x, positions, segment_ids, cache=cache, remat=self.compute.remat)

    def batch_hidden_states(self, micro: Batch, *, packed: bool = True, dropout_key=None
                            ) -> ModelOutput:
        """`hidden_states` of one micro-batch of the training-batch contract; `packed` False
        runs every row as one sequence (its segment ids unused)."""
        return self.hidden_states(micro.input_ids, micro.pixel_values, micro.image_flags,
                                  micro.positions, micro.segment_ids if packed else None,
                                  dropout_key=dropout_key)

    def __call__(self, input_ids, pixel_values=None, image_flags=None, positions=None,
                 segment_ids=None, *, dropout_key=None) -> jax.Array:
        """Logits [B, S, vocab] in float32."""
        out = self.hidden_states(input_ids, pixel_values, image_flags, positions, segment_ids,
                                 dropout_key=dropout_key)
        return self.llm.logits(out.hidden)
