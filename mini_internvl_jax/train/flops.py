"""Model FLOPs of a training step from the config, vision tower included (for MFU).

Matmul FLOPs only (2 per multiply-add), counted from the shapes; remat recomputation is not
counted (this is *model* FLOPs, as in MFU). Per forward pass:

  ViT, per tile of n = g*g + 1 tokens (g = image_size / patch) and L used layers:
      2*g*g*(3*p*p)*d                         patch embedding
      L * [2*n*(4*d*d + 2*d*f) + 4*n*n*d]     qkv+proj, fc1+fc2; QK^T and PV (bidirectional)
  projector, per tile of m = num_image_tokens output tokens, c = d*s*s input channels:
      2*m*(c*h + h*h)
  LLM, per token of a row of S positions, L layers:
      L * [2*(h*q + 2*h*kv + q*h + 3*h*f) + 2*S*q]   q = heads*head_dim, kv = kv_heads*head_dim;
                                                     attention 4*S*q halved for causal masking
      2*h*V                                          the LM head

A training step costs forward + activation gradients + weight gradients, each about one
forward pass. A frozen part skips its weight gradients, and a frozen part with nothing trainable
upstream of it and no LoRA adapters inside (a frozen ViT; a frozen LLM after a frozen projector)
skips activation gradients too. The same formula with every part trained is what a
PyTorch reference step count gives (leaving out the small patch embedding).
"""

from __future__ import annotations

from mini_internvl_jax.config import ModelConfig

PARTS = ("vision", "projector", "llm")


def forward_flops(cfg: ModelConfig, *, batch: int, seq_len: int, tiles: int) -> dict[str, float]:
    """Forward-pass FLOPs per part for `batch` rows of `seq_len` tokens and `tiles` real tiles."""
    v = cfg.vision
    g, p, d, f = v.grid_size, v.patch_size, v.hidden_size, v.intermediate_size
    n = g * g + 1
    vit_tile = (2 * g * g * (v.num_channels * p * p) * d
                + cfg.num_vision_layers_used * (2 * n * (4 * d * d + 2 * d * f) + 4 * n * n * d))
    llm = cfg.llm
    h, q = llm.hidden_size, llm.num_heads * llm.head_size
    kv = llm.num_kv_heads * llm.head_size
    m = cfg.num_image_tokens
    proj_tile = 2 * m * (cfg.projector_in_dim * h + h * h)
    per_token = (llm.num_layers * (2 * (h * q + 2 * h * kv + q * h + 3 * h * llm.intermediate_size)
                                   + 2 * seq_len * q)
                 + 2 * h * llm.vocab_size)
    return {"vision": float(tiles * vit_tile), "projector": float(tiles * proj_tile),
            "llm": float(batch * seq_len * per_token)}


def step_flops(cfg: ModelConfig, *, batch: int, seq_len: int, tiles: int,
               trainable: frozenset[str] = frozenset(PARTS),
               adapters: frozenset[str] = frozenset()) -> float:
    """Training-step model FLOPs. `trainable`: parts whose weights get gradients;
    `adapters`: parts with LoRA adapters (activation gradients flow through them)."""
    fwd = forward_flops(cfg, batch=batch, seq_len=seq_len, tiles=tiles)
    total, upstream = 0.0, False
    for part in PARTS:
        weight_grads = part in trainable
        act_grads = upstream or weight_grads or part in adapters
        total += fwd[part] * (1 + int(act_grads) + int(weight_grads))
        upstream = upstream or weight_grads or part in adapters
    return total
