"""Tiny InternVL checkpoints on disk: HF folders in both layouts, built from transformers
models, and converted (Orbax) folders written from an NNX model.

The original (remote-code) names, the fused ViT qkv and the InternLM2 `wqkv` packing are written
out here from InternVL's published modelling code, independently of
mini_internvl_jax.convert.mapping, so the converter is checked against a second reading of it.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import torch
import transformers
from flax import nnx
from safetensors import safe_open
from safetensors.torch import save_file

from mini_internvl_jax.convert.orbax_io import save_params, write_model_config
from tests.helpers import hf_reference as ref

ARCH = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
        "internlm2": "InternLM2ForCausalLM", "phi3": "Phi3ForCausalLM"}
TEXT_OF = {"qwen2": "qwen2", "qwen3": "qwen3", "internlm2": "llama", "phi3": "phi3"}
TEMPLATE = {"qwen2": "Hermes-2", "qwen3": "internvl2_5", "internlm2": "internlm2-chat",
            "phi3": "phi3-chat"}


def native_model(family: str, tie: bool = False):
    """(torch InternVLForConditionalGeneration, its config); InternLM2 math = Llama math."""
    hf_cfg, _ = ref.internvl_pair(TEXT_OF[family], tie=tie)
    return ref.randomize_(transformers.InternVLForConditionalGeneration(hf_cfg)), hf_cfg


def pack_wqkv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """Rows per KV head h: [q_(h*g) .. q_(h*g+g-1), k_h, v_h], head by head (InternLM2's layout)."""
    heads = q.shape[0] // (k.shape[0] // kv_heads)
    hd = k.shape[0] // kv_heads
    g = heads // kv_heads
    rows = []
    for h in range(kv_heads):
        for slot in range(g):
            qh = h * g + slot
            rows.append(q[qh * hd:(qh + 1) * hd])
        rows.append(k[h * hd:(h + 1) * hd])
        rows.append(v[h * hd:(h + 1) * hd])
    return torch.cat(rows, 0)


def original_state_dict(native_sd: dict, family: str, kv_heads: int, tied: bool = False
                        ) -> dict:
    """transformers-native names -> InternVL remote-code names (InternVL's checkpoints)."""
    out = {}
    sd = {k: v.detach().clone() for k, v in native_sd.items()}
    vt = "model.vision_tower."
    emb = {"embeddings.cls_token": "embeddings.class_embedding",
           "embeddings.position_embeddings": "embeddings.position_embedding",
           "embeddings.patch_embeddings.projection.weight": "embeddings.patch_embedding.weight",
           "embeddings.patch_embeddings.projection.bias": "embeddings.patch_embedding.bias"}
    for theirs, ours in emb.items():
        out["vision_model." + ours] = sd.pop(vt + theirs)
    layer_names = {"attention.projection_layer": "attn.proj", "lambda_1": "ls1",
                   "lambda_2": "ls2", "layernorm_before": "norm1", "layernorm_after": "norm2",
                   "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(100):
        src = f"{vt}encoder.layer.{i}."
        if src + "lambda_1" not in sd:
            break
        dst = f"vision_model.encoder.layers.{i}."
        for p in ("weight", "bias"):
            out[dst + f"attn.qkv.{p}"] = torch.cat(
                [sd.pop(src + f"attention.{x}_proj.{p}") for x in "qkv"], 0)
        for key in [k for k in sd if k.startswith(src)]:
            rest = key[len(src):]
            for theirs, ours in layer_names.items():
                if rest.startswith(theirs):
                    out[dst + ours + rest[len(theirs):]] = sd.pop(key)
    proj = {"layer_norm": "mlp1.0", "linear_1": "mlp1.1", "linear_2": "mlp1.3"}
    for theirs, ours in proj.items():
        for p in ("weight", "bias"):
            out[f"{ours}.{p}"] = sd.pop(f"model.multi_modal_projector.{theirs}.{p}")
    head = "language_model.output.weight" if family == "internlm2" else \
        "language_model.lm_head.weight"
    if tied:  # a tied head is the embedding; checkpoints do not store it twice
        sd.pop("lm_head.weight")
    else:
        out[head] = sd.pop("lm_head.weight")
    lm = "model.language_model."
    if family == "internlm2":
        for key in [k for k in sd if re.fullmatch(r".*layers\.\d+\.self_attn\.q_proj\.weight", k)]:
            base = key[:-len("q_proj.weight")]
            i = re.search(r"layers\.(\d+)\.", key).group(1)
            out[f"language_model.model.layers.{i}.attention.wqkv.weight"] = pack_wqkv(
                sd.pop(base + "q_proj.weight"), sd.pop(base + "k_proj.weight"),
                sd.pop(base + "v_proj.weight"), kv_heads)
    for key in list(sd):
        if not key.startswith(lm):
            continue
        rest = key[len(lm):]
        if family == "internlm2":
            for theirs, ours in (("embed_tokens", "tok_embeddings"),
                                 ("self_attn.o_proj", "attention.wo"),
                                 ("mlp.gate_proj", "feed_forward.w1"),
                                 ("mlp.up_proj", "feed_forward.w3"),
                                 ("mlp.down_proj", "feed_forward.w2"),
                                 ("input_layernorm", "attention_norm"),
                                 ("post_attention_layernorm", "ffn_norm")):
                rest = rest.replace(theirs, ours)
        out["language_model.model." + rest] = sd.pop(key)
    assert not sd, f"unmapped: {sorted(sd)}"
    return out


def original_config(hf_cfg, family: str, image_token_id=None, template=None) -> dict:
    """An InternVL2-style config.json (legacy rope keys, as the released checkpoints have)."""
    v, t = hf_cfg.vision_config, hf_cfg.text_config
    rope = dict(t.rope_parameters)
    llm = {"architectures": [ARCH[family]], "model_type": family, "vocab_size": t.vocab_size,
           "hidden_size": t.hidden_size, "intermediate_size": t.intermediate_size,
           "num_hidden_layers": t.num_hidden_layers,
           "num_attention_heads": t.num_attention_heads,
           "num_key_value_heads": t.num_key_value_heads, "hidden_act": "silu",
           "max_position_embeddings": t.max_position_embeddings, "rms_norm_eps": t.rms_norm_eps,
           "rope_theta": rope["rope_theta"], "rope_scaling": None,
           "tie_word_embeddings": bool(t.tie_word_embeddings),
           "torch_dtype": "bfloat16", "use_cache": True}
    if family == "qwen2":
        llm.update(use_sliding_window=False, sliding_window=t.max_position_embeddings,
                   max_window_layers=t.num_hidden_layers)
    if family == "qwen3":  # as InternVL3.5's llm_config (Qwen3-0.6B ... 8B)
        llm.update(head_dim=t.head_dim, attention_bias=False, use_sliding_window=False,
                   sliding_window=None, max_window_layers=t.num_hidden_layers)
    if family == "internlm2":
        # dynamic NTK only acts past max_position_embeddings: a no-op for these tests.
        llm.update(bias=False, rope_scaling={"type": "dynamic", "factor": 2.0},
                   attn_implementation="eager")
    if family == "phi3":
        llm.update(rope_scaling={"type": "su", "short_factor": rope["short_factor"],
                                 "long_factor": rope["long_factor"]},
                   original_max_position_embeddings=rope["original_max_position_embeddings"],
                   sliding_window=None, embd_pdrop=0.0, resid_pdrop=0.0)
    vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
              "hidden_size": v.hidden_size, "num_hidden_layers": v.num_hidden_layers,
              "num_attention_heads": v.num_attention_heads,
              "intermediate_size": v.intermediate_size, "image_size": v.image_size[0],
              "patch_size": v.patch_size[0], "num_channels": 3, "norm_type": v.norm_type,
              "layer_norm_eps": v.layer_norm_eps, "qkv_bias": v.attention_bias,
              "qk_normalization": v.use_qk_norm, "initializer_factor": 1.0,
              "drop_path_rate": 0.0, "hidden_act": "gelu", "use_flash_attn": True}
    return {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
            "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                         "AutoModel": "modeling_internvl_chat.InternVLChatModel"},
            "template": template or TEMPLATE[family], "downsample_ratio": 0.5, "ps_version": "v2",
            "select_layer": -1, "force_image_size": v.image_size[0],
            "dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
            "max_dynamic_patch": 12, "torch_dtype": "bfloat16",
            "vision_config": vision, "llm_config": llm}


def save_state(folder: Path, sd: dict, shards: int = 1) -> None:
    """safetensors via the safetensors library (one file, or `shards` files + index)."""
    names = sorted(sd)
    if shards == 1:
        save_file({k: sd[k].contiguous() for k in names}, str(folder / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    weight_map = {}
    for s, part in enumerate(np.array_split(np.array(names), shards)):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        save_file({k: sd[k].contiguous() for k in part}, str(folder / file),
                  metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part.tolist(), file))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))


def write_original(folder: Path, model, hf_cfg, family: str, *, dtype=torch.float32,
                   shards: int = 1, tokenizer: bool = True, template: str | None = None
                   ) -> dict:
    """An original-layout InternVL folder; returns the state dict written."""
    folder.mkdir(parents=True, exist_ok=True)
    sd = original_state_dict(model.state_dict(), family, hf_cfg.text_config.num_key_value_heads,
                             tied=bool(hf_cfg.text_config.tie_word_embeddings))
    sd = {k: v.to(dtype) for k, v in sd.items()}
    save_state(folder, sd, shards)
    (folder / "config.json").write_text(json.dumps(original_config(hf_cfg, family,
                                                                   template=template)))
    if tokenizer:
        (folder / "added_tokens.json").write_text(json.dumps({"<img>": ref.IMAGE_TOKEN - 1,
                                                              "<IMG_CONTEXT>": ref.IMAGE_TOKEN}))
        (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}))
    return sd


def read_tensors(folder: Path) -> dict[str, np.ndarray]:
    """Every tensor of a safetensors folder, via the safetensors library (numpy)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    out = {}
    for f in files:
        with safe_open(str(f), "np") as h:
            for k in h.keys():
                out[k] = h.get_tensor(k)
    return out


def inputs():
    """Two rows, three 56px tiles (4 image tokens each) placed at varied offsets."""
    ids = ref.internvl_input_ids([2, 1], seq_len=20)
    px = np.random.RandomState(7).randn(3, 3, 56, 56).astype(np.float32)
    return ids, px


def torch_logits(model, ids, px) -> np.ndarray:
    with torch.no_grad():
        return model(input_ids=torch.tensor(ids, dtype=torch.long),
                     pixel_values=torch.tensor(px)).logits.float().numpy()


def rel_err(ours, theirs) -> float:
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    return float(np.max(np.abs(ours - theirs)) / np.max(np.abs(theirs)))


def leftovers(parent: Path) -> list[str]:
    """Temporary folders a failed conversion might have left behind."""
    return [p.name for p in Path(parent).iterdir() if ".tmp-" in p.name or ".old-" in p.name]


def save_checkpoint(model, folder: Path, tokenizer_dir: Path) -> None:
    """A converted checkpoint folder (Orbax params, model config, tokenizer files) from an NNX
    model, as `mivl-convert` writes one, for the chat and evaluation CLIs."""
    flat = {tuple(p): np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}
    folder.mkdir()
    save_params(folder / "params", flat)
    write_model_config(folder, model.cfg)
    for f in tokenizer_dir.iterdir():
        shutil.copy(f, folder / f.name)
