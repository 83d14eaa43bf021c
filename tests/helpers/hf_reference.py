"""Tiny random PyTorch/transformers reference models and the matching project configs.

Weights are re-drawn with a larger spread than the HF init so that parity tests are sensitive
to every parameter (near-zero weights would hide layout mistakes).
"""

from __future__ import annotations

import numpy as np
import torch
import transformers

from mini_internvl_jax.config import LLMConfig, ModelConfig, RopeScaling, VisionConfig

VOCAB = 320
IMAGE_TOKEN = 300


def randomize_(model: torch.nn.Module, seed: int = 0, std: float = 0.08) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g) * std
            if name.endswith(("norm.weight", "layernorm.weight", "lambda_1", "lambda_2",
                              "_layernorm.weight", "layer_norm.weight", "norm1.weight",
                              "norm2.weight", "layernorm_before.weight",
                              "layernorm_after.weight", "q_norm.weight", "k_norm.weight")):
                p.copy_(1.0 + noise)
            else:
                p.copy_(noise)
    return model.eval()


def qwen2_pair(layers=2, tie=False):
    hf = transformers.Qwen2Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
        rope_theta=10000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie,
        attn_implementation="eager", use_sliding_window=False)
    ours = LLMConfig(family="qwen2", vocab_size=VOCAB, hidden_size=64, num_layers=layers,
                     num_heads=4, num_kv_heads=2, intermediate_size=96, rms_norm_eps=1e-6,
                     rope_theta=10000.0, max_position_embeddings=512, qkv_bias=True,
                     tie_word_embeddings=tie)
    return hf, ours, transformers.Qwen2ForCausalLM


def qwen3_pair(layers=2, tie=False):
    """Qwen3: per-head q/k RMSNorm, no biases, head_dim 32 != hidden 64 / 4 heads (as in
    Qwen3-0.6B: 1024 hidden, 16 heads of 128)."""
    hf = transformers.Qwen3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=512,
        rope_theta=1000000.0, rms_norm_eps=1e-6, tie_word_embeddings=tie, attention_bias=False,
        attn_implementation="eager", use_sliding_window=False)
    ours = LLMConfig(family="qwen3", vocab_size=VOCAB, hidden_size=64, num_layers=layers,
                     num_heads=4, num_kv_heads=2, head_dim=32, intermediate_size=96,
                     rms_norm_eps=1e-6, rope_theta=1000000.0, max_position_embeddings=512,
                     tie_word_embeddings=tie)
    return hf, ours, transformers.Qwen3ForCausalLM


def llama_pair(layers=2, heads=8, kv_heads=2):
    """LlamaForCausalLM stands in for InternLM2's math (no biases, GQA)."""
    hf = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=112, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=512,
        rope_theta=1000000.0, rms_norm_eps=1e-5, tie_word_embeddings=False,
        attn_implementation="eager")
    ours = LLMConfig(family="llama", vocab_size=VOCAB, hidden_size=64, num_layers=layers,
                     num_heads=heads, num_kv_heads=kv_heads, intermediate_size=112,
                     rms_norm_eps=1e-5, rope_theta=1000000.0, max_position_embeddings=512)
    return hf, ours, transformers.LlamaForCausalLM


def phi3_pair(layers=2, original_max=32, max_pos=256, seed=0):
    head_dim = 16
    rng = np.random.RandomState(seed)
    short = [float(x) for x in 1.0 + rng.rand(head_dim // 2)]
    long = [float(x) for x in 1.0 + 4.0 * rng.rand(head_dim // 2)]
    hf = transformers.Phi3Config(
        vocab_size=VOCAB, hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=max_pos,
        original_max_position_embeddings=original_max, rope_theta=10000.0, rms_norm_eps=1e-5,
        rope_scaling={"type": "longrope", "short_factor": short, "long_factor": long},
        tie_word_embeddings=False, pad_token_id=0, bos_token_id=1, eos_token_id=2,
        attn_implementation="eager")
    ours = LLMConfig(family="phi3", vocab_size=VOCAB, hidden_size=64, num_layers=layers,
                     num_heads=4, num_kv_heads=4, intermediate_size=96, rms_norm_eps=1e-5,
                     rope_theta=10000.0, max_position_embeddings=max_pos,
                     rope_scaling=RopeScaling(type="longrope", short_factor=tuple(short),
                                              long_factor=tuple(long),
                                              original_max_position_embeddings=original_max))
    return hf, ours, transformers.Phi3ForCausalLM


def vision_pair(norm_type="layer_norm", qk_norm=False, qkv_bias=True, layers=2):
    hf = transformers.InternVLVisionConfig(
        hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, intermediate_size=64,
        image_size=[56, 56], patch_size=[14, 14], norm_type=norm_type, use_qk_norm=qk_norm,
        attention_bias=qkv_bias, layer_norm_eps=1e-6, use_mean_pooling=True,
        attn_implementation="eager")
    ours = VisionConfig(hidden_size=32, num_layers=layers, num_heads=2, intermediate_size=64,
                        image_size=56, patch_size=14, norm_type=norm_type, norm_eps=1e-6,
                        qkv_bias=qkv_bias, qk_normalization=qk_norm)
    return hf, ours


def internvl_pair(text: str = "qwen2", vision_layers=2, llm_layers=2, tie=False,
                  template="Hermes-2"):
    """InternVLForConditionalGeneration (native layout) with a tiny text model."""
    hf_vision, vision = vision_pair(layers=vision_layers)
    builders = {"qwen2": qwen2_pair, "qwen3": qwen3_pair, "llama": llama_pair,
                "phi3": phi3_pair}
    kw = {"tie": tie} if tie else {}
    hf_text, llm, _ = builders[text](layers=llm_layers, **kw)
    hf = transformers.InternVLConfig(
        vision_config=hf_vision.to_dict(), text_config=hf_text.to_dict(),
        image_token_id=IMAGE_TOKEN, image_seq_length=4, downsample_ratio=0.5,
        projector_hidden_act="gelu", vision_feature_layer=-1,
        vision_feature_select_strategy="default", tie_word_embeddings=tie)
    hf._attn_implementation = "eager"
    ours = ModelConfig(vision=vision, llm=llm, image_token_id=IMAGE_TOKEN, template=template)
    return hf, ours


def internvl_input_ids(tiles_per_row: list[int], seq_len: int, seed: int = 0,
                       per_tile: int = 4) -> np.ndarray:
    """Text ids with `per_tile * tiles` image placeholders per row, at varied offsets."""
    rng = np.random.RandomState(seed)
    rows = []
    for r, tiles in enumerate(tiles_per_row):
        ids = rng.randint(10, 290, size=seq_len)
        start = 2 + r
        ids[start:start + per_tile * tiles] = IMAGE_TOKEN
        rows.append(ids)
    return np.stack(rows).astype(np.int32)
