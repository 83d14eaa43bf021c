"""config.json <-> ModelConfig, for InternVL checkpoints in both layouts.

`original`: InternVL's remote code (`model_type: internvl_chat`, `vision_config` + `llm_config`).
`native`: transformers' InternVLForConditionalGeneration (`vision_config` + `text_config`).
What a checkpoint can change on its own (vocabulary size, the position-table grid, a tied LM head,
q/k/v biases) is read from the tensors, not trusted from the config.
"""

from __future__ import annotations

import copy
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from mini_internvl_jax import configlib
from mini_internvl_jax.config import TEMPLATE_NAMES, ModelConfig, model_config_from_dict
from mini_internvl_jax.convert.errors import (
    CheckpointReadError,
    ConversionError,
    UnknownArchitectureError,
)
from mini_internvl_jax.convert.mapping import key_tensor_names
from mini_internvl_jax.data.errors import TokenizerError
from mini_internvl_jax.data.templates import get_template
from mini_internvl_jax.data.tokenizer import IMG_CONTEXT, image_context_id

# llm_config.architectures[0] of the original layout -> our family. Qwen2.5 decoders (InternVL2.5
# / InternVL3) are Qwen2ForCausalLM, InternLM2.5 decoders InternLM2ForCausalLM, InternVL3.5's
# dense decoders Qwen3ForCausalLM.
ORIGINAL_LLM_ARCHITECTURES = {"Qwen2ForCausalLM": "qwen2", "Qwen3ForCausalLM": "qwen3",
                              "InternLM2ForCausalLM": "internlm2", "Phi3ForCausalLM": "phi3",
                              "LlamaForCausalLM": "llama"}
NATIVE_TEXT_TYPES = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama", "phi3": "phi3"}
_ARCH_OF_FAMILY = {v: k for k, v in ORIGINAL_LLM_ARCHITECTURES.items()}
_NATIVE_TYPE_OF_FAMILY = {"qwen2": "qwen2", "qwen3": "qwen3", "llama": "llama",
                          "internlm2": "llama", "phi3": "phi3"}
# The template when a checkpoint names none: InternVL2-1B/2B/4B's (Hermes-2, internlm2-chat,
# phi3-chat); Qwen3 decoders only come with InternVL3.5, whose template is internvl2_5.
DEFAULT_TEMPLATES = {"qwen2": "Hermes-2", "qwen3": "internvl2_5", "internlm2": "internlm2-chat",
                     "phi3": "phi3-chat", "llama": "internlm2-chat"}
# <IMG_CONTEXT> in each family's tokenizer after InternVL's 9 added tokens (<img>, </img>,
# <IMG_CONTEXT>, <quad>, </quad>, <ref>, </ref>, <box>, </box>). The tokenizer files, when
# present, win (InternVL2.5/3's Qwen2.5 tokenizer, 151665 tokens, places it at 151667). Qwen3's
# tokenizer has 151669 tokens (ids up to </think> 151668), so InternVL3.5's is 151671.
DEFAULT_IMAGE_TOKEN_IDS = {"qwen2": 151648, "qwen3": 151671, "internlm2": 92546, "phi3": 32013}
# Released-config fields that change the model in ways not implemented here: refused by name
# (with the value they take when they change nothing). V2PE: variable visual position encoding.
UNSUPPORTED_FIELDS: dict[str, dict[str, object]] = {
    "": {"rope_pos_id_version": "default", "rope_pos_id_stride": None, "use_backbone_lora": 0,
         "use_llm_lora": 0, "pad2square": False},
    "llm_config": {"use_sliding_window": False, "mlp_bias": False,
                   "partial_rotary_factor": 1.0, "num_experts": None, "num_local_experts": None,
                   "moe_intermediate_size": None, "rope_pos_id_version": "default"},
    "vision_config": {"use_mask_token": False, "use_mean_pooling": True,
                      "use_absolute_position_embeddings": True},
}
# Released InternVL2 values (their config.json) for the keys our ModelConfig does not carry.
_ORIGINAL_DEFAULTS = {"dynamic_image_size": True, "use_thumbnail": True, "min_dynamic_patch": 1,
                      "max_dynamic_patch": 12, "use_backbone_lora": 0, "use_llm_lora": 0,
                      "pad2square": False}


@dataclass(frozen=True)
class HFModelInfo:
    config: ModelConfig
    layout: str
    template_source: str       # "config.json", "family default" or "override"
    image_token_source: str    # the file the <IMG_CONTEXT> id came from, or "family default"


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise CheckpointReadError(f"{path} does not exist; {what} is required") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointReadError(f"cannot read {what} {path}: {e}") from None
    if not isinstance(data, dict):
        raise CheckpointReadError(f"{path}: {what} must hold a JSON object")
    return data


def detect_layout(hf: dict, where: str) -> str:
    archs = hf.get("architectures") or []
    if (hf.get("model_type") == "internvl_chat" or "InternVLChatModel" in archs
            or "llm_config" in hf) and "vision_config" in hf and "llm_config" in hf:
        return "original"
    if "vision_config" in hf and "text_config" in hf:
        return "native"
    raise UnknownArchitectureError(
        f"{where}: unknown architecture (model_type {hf.get('model_type')!r}, architectures "
        f"{archs!r}); expected InternVL's original layout (model_type 'internvl_chat' with "
        "vision_config and llm_config) or transformers' InternVLForConditionalGeneration "
        "(vision_config and text_config)")


def check_unsupported_fields(d: dict, section: str, prefix: str, where: str = "config.json"
                             ) -> None:
    """A one-line error for the first field of `section` (a key of UNSUPPORTED_FIELDS; "" is the
    top level) that `d` sets to something other than its neutral value; `prefix` names `d`."""
    for key, neutral in UNSUPPORTED_FIELDS[section].items():
        value = d.get(key, neutral)
        if value is not None and value != neutral:
            name = f"{prefix}.{key}" if prefix else key
            raise UnknownArchitectureError(
                f"{where}: {name} is {value!r}; this field is not implemented here (supported: "
                f"{neutral!r}), so the model would not match its checkpoint")


def template_from_chat_template(folder: Path) -> str | None:
    """The InternVL template a native (`-hf`) folder's own Jinja chat template spells out:
    `<|im_end|>` followed by a newline is internvl2_5 (InternVL2.5 / 3 / 3.5), `<|im_end|>`
    without one Hermes-2; None when the folder has no chat template."""
    texts = []
    for name in ("chat_template.jinja", "chat_template.json", "tokenizer_config.json",
                 "processor_config.json"):
        path = Path(folder) / name
        if not path.is_file():
            continue
        text = path.read_text(errors="replace")
        if name.endswith(".json"):
            try:
                text = str(json.loads(text).get("chat_template") or "")
            except (json.JSONDecodeError, AttributeError):
                continue
        texts.append(text)
    text = "".join(texts)
    if "<|im_end|>" not in text:
        return None
    return "internvl2_5" if re.search(r"<\|im_end\|>('\s*\+\s*')?(\\n|\n)", text) \
        else "Hermes-2"


def _get(d: dict, key: str, where: str, default=None, required: bool = False):
    if key in d and d[key] is not None:
        return d[key]
    if required:
        raise ConversionError(f"{where}.{key} is missing from config.json")
    return default


def _square(value, where: str) -> int:
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise UnknownArchitectureError(f"{where} is {list(value)}; only square sizes are "
                                           "supported")
        value = value[0]
    return int(value)


def _check_act(d: dict, where: str, expected: str) -> None:
    act = d.get("hidden_act", expected)
    if act != expected:
        raise UnknownArchitectureError(f"{where}.hidden_act is {act!r}; this model uses "
                                       f"{expected!r}")


def _pos_grid(shape, where: str, name: str) -> int:
    if shape is None:
        raise ConversionError(f"checkpoint is missing tensor {name!r}")
    n = shape[1] - 1 if len(shape) == 3 else -1
    g = math.isqrt(max(n, 0))
    if n <= 0 or g * g != n:
        raise ConversionError(f"tensor {name!r} has shape {tuple(shape)}, expected "
                              "(1, grid*grid + 1, hidden)")
    return g


def _vision(v: dict, layout: str, where: str, pos_shape, pos_name: str, image_size=None) -> dict:
    _check_act(v, where, "gelu")
    orig = layout == "original"
    patch = _square(_get(v, "patch_size", where, 14), f"{where}.patch_size")
    image = image_size or _square(_get(v, "image_size", where, 224 if orig else 448),
                                  f"{where}.image_size")
    grid = _pos_grid(pos_shape, where, pos_name)
    out = {
        "hidden_size": _get(v, "hidden_size", where, required=True),
        "num_layers": _get(v, "num_hidden_layers", where, required=True),
        "num_heads": _get(v, "num_attention_heads", where, required=True),
        "intermediate_size": _get(v, "intermediate_size", where, required=True),
        "image_size": image, "patch_size": patch,
        "num_channels": _get(v, "num_channels", where, 3),
        # Defaults are each config class's own (InternVisionConfig / InternVLVisionConfig).
        "norm_type": _get(v, "norm_type", where, "rms_norm" if orig else "layer_norm"),
        "norm_eps": float(_get(v, "layer_norm_eps", where, 1e-6)),
        "qkv_bias": _get(v, "qkv_bias" if orig else "attention_bias", where, False),
        "qk_normalization": _get(v, "qk_normalization" if orig else "use_qk_norm", where, orig),
        "layer_scale_init": float(_get(v, "initializer_factor" if orig else
                                       "layer_scale_init_value", where, 0.1)),
        "drop_path_rate": float(_get(v, "drop_path_rate", where, 0.0)),
    }
    if grid != image // patch:
        out["pos_grid_size"] = grid
    return out


def _rope(d: dict, where: str) -> tuple[float, dict | None]:
    params: dict = {}
    for key in ("rope_scaling", "rope_parameters"):
        if isinstance(d.get(key), dict):
            params.update(d[key])
    theta = float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)
    kind = params.get("rope_type") or params.get("type") or "default"
    if kind == "default":
        return theta, None
    if kind == "dynamic":
        return theta, {"type": "dynamic", "factor": float(params.get("factor", 1.0))}
    if kind in ("su", "longrope"):
        orig = params.get("original_max_position_embeddings") or \
            d.get("original_max_position_embeddings")
        if orig is None:
            raise ConversionError(f"{where}: longrope scaling needs "
                                  "original_max_position_embeddings")
        if float(params.get("partial_rotary_factor", 1.0) or 1.0) != 1.0:
            raise UnknownArchitectureError(f"{where}: partial_rotary_factor "
                                           f"{params['partial_rotary_factor']} is not supported")
        if params.get("attention_factor") is not None or params.get("factor") is not None:
            raise UnknownArchitectureError(
                f"{where}: longrope with an explicit factor/attention_factor is not supported "
                "(Phi-3 derives it from max_position_embeddings / "
                "original_max_position_embeddings)")
        return theta, {"type": "longrope", "original_max_position_embeddings": int(orig),
                       "short_factor": [float(x) for x in params.get("short_factor") or []]
                       or None,
                       "long_factor": [float(x) for x in params.get("long_factor") or []] or None}
    raise UnknownArchitectureError(f"{where}: rope scaling type {kind!r} is not supported "
                                   "(supported: default, dynamic, su/longrope)")


def _llm(t: dict, family: str, where: str, vocab: int, tie: bool, qkv_bias: bool) -> dict:
    _check_act(t, where, "silu")
    check_unsupported_fields(t, "llm_config", where)
    kinds = sorted(set(t.get("layer_types") or ["full_attention"]) - {"full_attention"})
    if kinds:
        raise UnknownArchitectureError(f"config.json: {where}.layer_types has {kinds}; only "
                                       "full attention is implemented")
    if family == "phi3" and t.get("sliding_window") and \
            t["sliding_window"] < t.get("max_position_embeddings", 0):
        raise UnknownArchitectureError(f"{where}: sliding-window attention is not implemented")
    if family == "qwen3" and t.get("attention_bias"):
        raise UnknownArchitectureError(f"{where}.attention_bias is true; Qwen3 with q/k/v/o "
                                       "biases is not implemented (released Qwen3: false)")
    if family == "internlm2" and t.get("bias", True):
        raise UnknownArchitectureError(f"{where}: InternLM2 with bias=true is not supported "
                                       "(the released checkpoints set bias: false)")
    heads = _get(t, "num_attention_heads", where, required=True)
    theta, scaling = _rope(t, where)
    out = {
        "family": family, "vocab_size": vocab,
        "hidden_size": _get(t, "hidden_size", where, required=True),
        "num_layers": _get(t, "num_hidden_layers", where, required=True),
        "num_heads": heads,
        "num_kv_heads": _get(t, "num_key_value_heads", where, heads),
        "intermediate_size": _get(t, "intermediate_size", where, required=True),
        "rms_norm_eps": float(_get(t, "rms_norm_eps", where, 1e-6)),
        "rope_theta": theta, "rope_scaling": scaling,
        "max_position_embeddings": _get(t, "max_position_embeddings", where, required=True),
        "qkv_bias": qkv_bias, "tie_word_embeddings": tie,
    }
    if t.get("head_dim"):
        out["head_dim"] = t["head_dim"]
    return out


def image_token_id_from_tokenizer(folder: Path) -> tuple[int, str] | None:
    """(id, file) of `<IMG_CONTEXT>` from the tokenizer files in `folder`, read as the
    tokenizer loader reads them (data/tokenizer.py)."""
    try:
        return image_context_id(folder)
    except TokenizerError as e:
        raise CheckpointReadError(str(e)) from None


def _text_config(hf: dict, layout: str, where: str) -> tuple[dict, str, bool, str]:
    """(the decoder's config dict, its family, the tie-embeddings flag, the dict's name)."""
    if layout == "original":
        llm_cfg = hf["llm_config"]
        archs = llm_cfg.get("architectures") or [None]
        if archs[0] not in ORIGINAL_LLM_ARCHITECTURES:
            raise UnknownArchitectureError(
                f"{where}: llm_config.architectures[0] is {archs[0]!r}; supported: "
                f"{sorted(ORIGINAL_LLM_ARCHITECTURES)}")
        return (llm_cfg, ORIGINAL_LLM_ARCHITECTURES[archs[0]],
                llm_cfg.get("tie_word_embeddings", False), "llm_config")
    llm_cfg = hf["text_config"]
    mtype = llm_cfg.get("model_type", "qwen2")
    if mtype not in NATIVE_TEXT_TYPES:
        raise UnknownArchitectureError(f"{where}: text_config.model_type is {mtype!r}; "
                                       f"supported: {sorted(NATIVE_TEXT_TYPES)}")
    tie_flag = hf.get("tie_word_embeddings", llm_cfg.get("tie_word_embeddings", False))
    return llm_cfg, NATIVE_TEXT_TYPES[mtype], tie_flag, "text_config"


def model_config_from_hf(hf: dict, shape_of: Callable[[str], tuple | None], folder: Path,
                         overrides: list[str] | tuple[str, ...] = ()) -> HFModelInfo:
    """ModelConfig from config.json plus the checkpoint's tensor shapes (`shape_of(name)`)."""
    where = str(Path(folder) / "config.json")
    layout = detect_layout(hf, where)
    check_unsupported_fields(hf, "", "", where)
    llm_cfg, family, tie_flag, text_where = _text_config(hf, layout, where)
    names = key_tensor_names(layout, family)
    embed = shape_of(names["embed"])
    if embed is None or len(embed) != 2:
        raise ConversionError(f"checkpoint is missing the embedding tensor {names['embed']!r}"
                              if embed is None else f"tensor {names['embed']!r} has shape "
                              f"{tuple(embed)}, expected (vocab, hidden)")
    tie = bool(tie_flag) and shape_of(names["lm_head"]) is None
    qkv_bias = family == "qwen2" or (family == "llama" and shape_of(names["q_bias"]) is not None)
    llm = _llm(llm_cfg, family, text_where, embed[0], tie, qkv_bias)

    data: dict = {"llm": llm, "downsample_ratio": float(hf.get("downsample_ratio", 0.5))}
    pos = names["position_embedding"]
    if layout == "original":
        data["vision"] = _vision(hf["vision_config"], layout, "vision_config", shape_of(pos),
                                 pos, image_size=hf.get("force_image_size"))
        data["ps_version"] = hf.get("ps_version", "v1")
        data["select_layer"] = int(hf.get("select_layer", -1))
        template, template_source = hf.get("template"), "config.json"
    else:
        data["vision"] = _vision(hf["vision_config"], layout, "vision_config", shape_of(pos),
                                 pos)
        data["select_layer"] = int(hf.get("vision_feature_layer", -1))
        if hf.get("vision_feature_select_strategy", "default") != "default":
            raise UnknownArchitectureError(f"{where}: vision_feature_select_strategy "
                                           f"{hf['vision_feature_select_strategy']!r} is not "
                                           "supported (InternVL drops the CLS token: 'default')")
        check_unsupported_fields(hf["vision_config"], "vision_config", "vision_config", where)
        template = template_from_chat_template(folder)
        template_source = "chat template"
    if template is None:
        template, template_source = DEFAULT_TEMPLATES[family], "family default"
    system_message = hf.get("system_message")
    if system_message is not None and template in TEMPLATE_NAMES and \
            system_message != get_template(template).system_message:
        raise UnknownArchitectureError(
            f"{where}: system_message {system_message[:40]!r}... differs from template "
            f"{template!r}'s default; a per-checkpoint system message is not implemented")

    token = image_token_id_from_tokenizer(folder)
    if layout == "native" and hf.get("image_token_id") is not None:
        image_token, token_source = int(hf["image_token_id"]), "config.json"
    elif token is not None:
        image_token, token_source = token
    elif family in DEFAULT_IMAGE_TOKEN_IDS:
        image_token, token_source = DEFAULT_IMAGE_TOKEN_IDS[family], "family default"
    else:
        image_token, token_source = None, None
    data["image_token_id"] = image_token
    data["template"] = template
    data["name"] = Path(folder).resolve().name

    keys = {o.split("=", 1)[0].strip() for o in overrides}
    data = configlib.apply_overrides(data, list(overrides))
    if "template" in keys:
        template_source = "override"
    if "image_token_id" in keys:
        token_source = "override"
    if data.get("template") not in TEMPLATE_NAMES:
        raise UnknownArchitectureError(
            f"{where}: chat template {data.get('template')!r} is not supported; supported: "
            f"{list(TEMPLATE_NAMES)} (override with template=NAME)")
    token = data.get("image_token_id")
    if token is not None and (isinstance(token, bool) or not isinstance(token, int)):
        raise ConversionError(f"image_token_id {token!r} ({token_source}) is not an integer "
                              f"token id in [0, {embed[0]})")
    if token is None or not 0 <= token < embed[0]:
        found = (f"{token_source} gives {data.get('image_token_id')}" if token_source else
                 "no tokenizer file names it and the family has no default")
        raise ConversionError(
            f"cannot place {IMG_CONTEXT} in the vocabulary of {embed[0]} tokens of {folder}: "
            f"{found}; add the tokenizer files or override image_token_id=ID")
    assert token_source is not None, "an image_token_id without a source fails the check above"
    return HFModelInfo(model_config_from_dict(data), layout, template_source, token_source)


# --------------------------------------------------------------------------------------------
# export


def _deep_merge(base: dict, top: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in top.items():
        out[k] = _deep_merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) \
            else copy.deepcopy(v)
    return out


def _llm_common(cfg: ModelConfig) -> dict:
    llm = cfg.llm
    out = {"vocab_size": llm.vocab_size, "hidden_size": llm.hidden_size,
           "intermediate_size": llm.intermediate_size, "num_hidden_layers": llm.num_layers,
           "num_attention_heads": llm.num_heads, "num_key_value_heads": llm.num_kv_heads,
           "hidden_act": "silu", "max_position_embeddings": llm.max_position_embeddings,
           "rms_norm_eps": llm.rms_norm_eps, "tie_word_embeddings": llm.tie_word_embeddings}
    if llm.head_dim != llm.hidden_size // llm.num_heads:
        out["head_dim"] = llm.head_dim
    if llm.family == "qwen2":
        if not llm.qkv_bias:
            raise ConversionError("a qwen2 model without q/k/v biases cannot be written as "
                                  "Qwen2 (Qwen2 always has them)")
        out.update(use_sliding_window=False, sliding_window=llm.max_position_embeddings,
                   max_window_layers=llm.num_layers)
    elif llm.family == "qwen3":
        # Qwen3Config's head_dim default (128) is not hidden/heads: always written.
        out.update(head_dim=llm.head_dim, attention_bias=False, use_sliding_window=False,
                   sliding_window=None, max_window_layers=llm.num_layers)
    elif llm.family == "internlm2":
        out["bias"] = False
    elif llm.family == "llama":
        out.update(attention_bias=llm.qkv_bias, mlp_bias=False)
    elif llm.family == "phi3":
        out["sliding_window"] = None
    rs = llm.rope_scaling
    if rs is not None and rs.type == "longrope":
        out["original_max_position_embeddings"] = rs.original_max_position_embeddings
    return out


def _rope_fields(cfg: ModelConfig, layout: str, base_llm: dict) -> dict:
    llm = cfg.llm
    rs = llm.rope_scaling
    longrope: dict[str, object] = {}  # LongRoPE's factor lists, written by both layouts
    if rs is not None and rs.type == "longrope":
        if rs.short_factor is None or rs.long_factor is None:
            raise ConversionError(
                f"model config {cfg.name!r} has LongRoPE scaling without short_factor/"
                "long_factor lists (presets leave them to the checkpoint), and writing "
                "placeholder factors would change the model: pass the model_config.json of the "
                "converted folder these parameters came from (--model-config "
                "CONVERTED/model_config.json), which holds the checkpoint's lists")
        longrope = {"short_factor": list(rs.short_factor), "long_factor": list(rs.long_factor)}
    if layout == "original":
        scaling: dict[str, object] | None
        if rs is None:
            scaling = None
        elif rs.type == "dynamic":
            scaling = {"type": "dynamic", "factor": rs.factor}
        else:
            old = (base_llm.get("rope_scaling") or {}).get("type")
            # InternVL's vendored Phi3Config accepts exactly {type, short_factor, long_factor}.
            scaling = {"type": old if old in ("su", "longrope") else "su", **longrope}
        return {"rope_theta": llm.rope_theta, "rope_scaling": scaling}
    params: dict[str, object] = {"rope_type": "default" if rs is None else rs.type,
                                 "rope_theta": llm.rope_theta}
    if rs is not None and rs.type == "dynamic":
        params["factor"] = rs.factor
    elif rs is not None:
        params.update(longrope,
                      original_max_position_embeddings=rs.original_max_position_embeddings)
    return {"rope_parameters": params}


def hf_config_from_model(cfg: ModelConfig, layout: str, dtype: str, base: dict | None = None
                         ) -> dict:
    """config.json for `layout`; keys we do not model are kept from `base` (the source config)."""
    v = cfg.vision
    base = copy.deepcopy(base) if base and detect_layout(base, "source config") == layout else {}
    if layout == "original":
        base_llm = base.get("llm_config", {})
        llm = {"architectures": [_ARCH_OF_FAMILY[cfg.llm.family]],
               "model_type": cfg.llm.family, **_llm_common(cfg),
               **_rope_fields(cfg, layout, base_llm), "torch_dtype": dtype}
        vision = {"architectures": ["InternVisionModel"], "model_type": "intern_vit_6b",
                  "hidden_size": v.hidden_size, "num_hidden_layers": v.num_layers,
                  "num_attention_heads": v.num_heads, "intermediate_size": v.intermediate_size,
                  "image_size": v.stored_grid_size * v.patch_size, "patch_size": v.patch_size,
                  "num_channels": v.num_channels, "norm_type": v.norm_type,
                  "layer_norm_eps": v.norm_eps, "qkv_bias": v.qkv_bias,
                  "qk_normalization": v.qk_normalization,
                  "initializer_factor": v.layer_scale_init, "drop_path_rate": v.drop_path_rate,
                  "hidden_act": "gelu", "torch_dtype": dtype}
        owned = {"architectures": ["InternVLChatModel"], "model_type": "internvl_chat",
                 "vision_config": vision, "llm_config": llm, "template": cfg.template,
                 "downsample_ratio": cfg.downsample_ratio, "ps_version": cfg.ps_version,
                 "select_layer": cfg.select_layer, "force_image_size": v.image_size,
                 "torch_dtype": dtype}
        defaults = {**_ORIGINAL_DEFAULTS, "vision_config": {"use_flash_attn": True},
                    "auto_map": {"AutoConfig": "configuration_internvl_chat.InternVLChatConfig",
                                 "AutoModel": "modeling_internvl_chat.InternVLChatModel",
                                 "AutoModelForCausalLM":
                                     "modeling_internvl_chat.InternVLChatModel"}}
        return _deep_merge(_deep_merge(defaults, base), owned)
    if cfg.ps_version != "v2":
        raise ConversionError("transformers' InternVL only implements pixel-shuffle v2; this "
                              f"model uses {cfg.ps_version!r}: export the original layout")
    base_text = base.get("text_config", {})
    for legacy in ("rope_scaling", "rope_theta", "rope_parameters"):
        base_text.pop(legacy, None)
    if base:
        base["text_config"] = base_text
    family = cfg.llm.family
    text = {"model_type": _NATIVE_TYPE_OF_FAMILY[family],
            "architectures": [_ARCH_OF_FAMILY[_NATIVE_TYPE_OF_FAMILY[family]]],
            **_llm_common(cfg), **_rope_fields(cfg, layout, base_text), "dtype": dtype}
    if family == "internlm2":
        del text["bias"]
        text.update(attention_bias=False, mlp_bias=False)
    vision = {"model_type": "internvl_vision", "hidden_size": v.hidden_size,
              "num_hidden_layers": v.num_layers, "num_attention_heads": v.num_heads,
              "intermediate_size": v.intermediate_size, "hidden_act": "gelu",
              "norm_type": v.norm_type, "layer_norm_eps": v.norm_eps,
              "image_size": [v.stored_grid_size * v.patch_size] * 2,
              "patch_size": [v.patch_size] * 2, "num_channels": v.num_channels,
              "use_qk_norm": v.qk_normalization, "attention_bias": v.qkv_bias,
              "layer_scale_init_value": v.layer_scale_init, "use_mean_pooling": True,
              "use_absolute_position_embeddings": True, "use_mask_token": False, "dtype": dtype}
    if v.stored_grid_size != v.grid_size:
        raise ConversionError(f"the position table's grid {v.stored_grid_size} differs from the "
                              f"image grid {v.grid_size}; transformers' InternVL cannot express "
                              "that: export the original layout")
    owned = {"architectures": ["InternVLForConditionalGeneration"], "model_type": "internvl",
             "vision_config": vision, "text_config": text, "image_token_id": cfg.image_token_id,
             "image_seq_length": cfg.num_image_tokens, "downsample_ratio": cfg.downsample_ratio,
             "projector_hidden_act": "gelu", "vision_feature_layer": cfg.select_layer,
             "vision_feature_select_strategy": "default",
             "tie_word_embeddings": cfg.llm.tie_word_embeddings, "dtype": dtype}
    return _deep_merge(base, owned)
