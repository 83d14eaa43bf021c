"""The name and layout mapping between PyTorch checkpoints and our parameter tree.

One table serves the converter (both directions) and the parity tests. Each `Rule` links a few
PyTorch tensors to a few of our parameters with a pair of pure numpy transforms, so a converter
can stream: read a rule's sources, write its targets, drop them.

Layouts:
  * `original`: InternVL's trust_remote_code names (`vision_model.`, `mlp1.`, `language_model.`);
  * `native`: transformers' InternVLForConditionalGeneration (`model.vision_tower.`, ...);
  * an LLM on its own (Qwen2ForCausalLM, ...) is `llm_rules(cfg, body="model.", head="lm_head")`.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable
from dataclasses import dataclass

import numpy as np

from mini_internvl_jax.config import LLMConfig, ModelConfig, VisionConfig

LAYOUTS = ("original", "native")
# Our parameter path (an nnx state path), e.g. ("llm", "norm", "weight"); ints index lists.
ParamPath = tuple[Hashable, ...]


@dataclass(frozen=True)
class Target:
    path: ParamPath                # inside a layer stack: relative to one layer
    layer: int | None = None  # layer index inside the stack `stack`
    stack: ParamPath | None = None


@dataclass(frozen=True)
class Rule:
    sources: tuple[str, ...]
    targets: tuple[Target, ...]
    to_jax: Callable[[list[np.ndarray]], list[np.ndarray]]
    to_hf: Callable[[list[np.ndarray]], list[np.ndarray]]
    # Expected source shapes, so mismatches are reported by tensor name before any transform.
    source_shapes: tuple[tuple[int, ...], ...]


def _same(_=None):
    return (lambda a: [a[0]]), (lambda a: [a[0]])


def _linear(in_dim: int, out_shape: tuple[int, ...]):
    """torch [out, in] <-> ours [in, *out_shape]."""
    return ((lambda a: [a[0].T.reshape((in_dim,) + out_shape)]),
            (lambda a: [a[0].reshape(in_dim, -1).T]))


def _linear_in(in_shape: tuple[int, ...], out_dim: int):
    """torch [out, in] <-> ours [*in_shape, out] (o_proj: heads x head_dim -> embed)."""
    return ((lambda a: [a[0].T.reshape(in_shape + (out_dim,))]),
            (lambda a: [a[0].reshape(-1, out_dim).T]))


def _reshape(shape: tuple[int, ...]):
    return (lambda a: [a[0].reshape(shape)]), (lambda a: [a[0].reshape(-1)])


def _rule(sources, targets, fns, shapes) -> Rule:
    to_jax, to_hf = fns
    return Rule(tuple(sources), tuple(targets), to_jax, to_hf, tuple(tuple(s) for s in shapes))


def _stack_path(stack: ParamPath, i: int) -> Callable[[ParamPath], Target]:
    return lambda p: Target(p, i, stack)


# --------------------------------------------------------------------------------------------
# vision


def vision_rules(cfg: VisionConfig, layout: str) -> list[Rule]:
    d, h, hd, p, c = cfg.hidden_size, cfg.num_heads, cfg.head_dim, cfg.patch_size, cfg.num_channels
    g = cfg.stored_grid_size
    i_dim = cfg.intermediate_size
    orig = layout == "original"
    pre = "vision_model." if orig else "model.vision_tower."
    emb = ("vision", "embeddings")
    patch_w = "patch_embedding.weight" if orig else "patch_embeddings.projection.weight"
    patch_b = "patch_embedding.bias" if orig else "patch_embeddings.projection.bias"
    rules = [
        _rule([pre + "embeddings." + ("class_embedding" if orig else "cls_token")],
              [Target(emb + ("class_embedding",))], _same(), [(1, 1, d)]),
        _rule([pre + "embeddings." + ("position_embedding" if orig else "position_embeddings")],
              [Target(emb + ("position_embedding",))], _same(), [(1, g * g + 1, d)]),
        _rule([pre + "embeddings." + patch_w], [Target(emb + ("patch_kernel",))],
              ((lambda a: [a[0].transpose(2, 3, 1, 0)]),
               (lambda a: [a[0].transpose(3, 2, 0, 1)])), [(d, c, p, p)]),
        _rule([pre + "embeddings." + patch_b], [Target(emb + ("patch_bias",))], _same(),
              [(d,)]),
    ]
    stack = ("vision", "encoder", "layers")
    norm_params = ("weight", "bias") if cfg.norm_type == "layer_norm" else ("weight",)
    for i in range(cfg.num_layers):
        t = _stack_path(stack, i)
        lp = f"{pre}encoder.layers.{i}." if orig else f"{pre}encoder.layer.{i}."
        names = {
            "norm1": "norm1" if orig else "layernorm_before",
            "norm2": "norm2" if orig else "layernorm_after",
            "proj": "attn.proj" if orig else "attention.projection_layer",
            "ls1": "ls1" if orig else "lambda_1",
            "ls2": "ls2" if orig else "lambda_2",
            "q_norm": "attn.q_norm" if orig else "attention.q_norm",
            "k_norm": "attn.k_norm" if orig else "attention.k_norm",
        }
        if orig:
            rules.append(_rule([lp + "attn.qkv.weight"], [t(("qkv", "kernel"))],
                               _linear(d, (3, h, hd)), [(3 * d, d)]))
            if cfg.qkv_bias:
                rules.append(_rule([lp + "attn.qkv.bias"], [t(("qkv", "bias"))],
                                   _reshape((3, h, hd)), [(3 * d,)]))
        else:
            srcs = [lp + f"attention.{x}_proj.weight" for x in "qkv"]
            rules.append(_rule(
                srcs, [t(("qkv", "kernel"))],
                ((lambda a: [np.stack([w.T.reshape(d, h, hd) for w in a], axis=1)]),
                 (lambda a: [a[0][:, j].reshape(d, d).T for j in range(3)])),
                [(d, d)] * 3))
            if cfg.qkv_bias:
                srcs = [lp + f"attention.{x}_proj.bias" for x in "qkv"]
                rules.append(_rule(
                    srcs, [t(("qkv", "bias"))],
                    ((lambda a: [np.stack([b.reshape(h, hd) for b in a], axis=0)]),
                     (lambda a: [a[0][j].reshape(-1) for j in range(3)])),
                    [(d,)] * 3))
        if cfg.qk_normalization:
            for ours in ("q_norm", "k_norm"):
                rules.append(_rule([lp + names[ours] + ".weight"], [t((ours, "weight"))],
                                   _same(), [(d,)]))
        rules += [
            _rule([lp + names["proj"] + ".weight"], [t(("proj", "kernel"))],
                  _linear_in((h, hd), d), [(d, d)]),
            _rule([lp + names["proj"] + ".bias"], [t(("proj", "bias"))], _same(), [(d,)]),
            _rule([lp + "mlp.fc1.weight"], [t(("fc1", "kernel"))], _linear(d, (i_dim,)),
                  [(i_dim, d)]),
            _rule([lp + "mlp.fc1.bias"], [t(("fc1", "bias"))], _same(), [(i_dim,)]),
            _rule([lp + "mlp.fc2.weight"], [t(("fc2", "kernel"))], _linear(i_dim, (d,)),
                  [(d, i_dim)]),
            _rule([lp + "mlp.fc2.bias"], [t(("fc2", "bias"))], _same(), [(d,)]),
            _rule([lp + names["ls1"]], [t(("ls1",))], _same(), [(d,)]),
            _rule([lp + names["ls2"]], [t(("ls2",))], _same(), [(d,)]),
        ]
        for ours in ("norm1", "norm2"):
            for prm in norm_params:
                rules.append(_rule([lp + names[ours] + "." + prm], [t((ours, prm))],
                                   _same(), [(d,)]))
    return rules


# --------------------------------------------------------------------------------------------
# projector


def projector_rules(cfg: ModelConfig, layout: str) -> list[Rule]:
    din, dout = cfg.projector_in_dim, cfg.llm.hidden_size
    if layout == "original":
        n_norm, n_fc1, n_fc2 = "mlp1.0", "mlp1.1", "mlp1.3"
    else:
        base = "model.multi_modal_projector."
        n_norm, n_fc1, n_fc2 = base + "layer_norm", base + "linear_1", base + "linear_2"
    pr = ("projector",)
    return [
        _rule([n_norm + ".weight"], [Target(pr + ("norm", "weight"))], _same(), [(din,)]),
        _rule([n_norm + ".bias"], [Target(pr + ("norm", "bias"))], _same(), [(din,)]),
        _rule([n_fc1 + ".weight"], [Target(pr + ("fc1", "kernel"))], _linear(din, (dout,)),
              [(dout, din)]),
        _rule([n_fc1 + ".bias"], [Target(pr + ("fc1", "bias"))], _same(), [(dout,)]),
        _rule([n_fc2 + ".weight"], [Target(pr + ("fc2", "kernel"))], _linear(dout, (dout,)),
              [(dout, dout)]),
        _rule([n_fc2 + ".bias"], [Target(pr + ("fc2", "bias"))], _same(), [(dout,)]),
    ]


# --------------------------------------------------------------------------------------------
# LLM


def _internlm2_wqkv(cfg: LLMConfig):
    d, h, kv, hd = cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size
    g = h // kv

    def to_jax(a):
        w = a[0].reshape(kv, g + 2, hd, d)
        q = w[:, :g].reshape(h * hd, d)
        return [q.T.reshape(d, h, hd), w[:, g].reshape(kv * hd, d).T.reshape(d, kv, hd),
                w[:, g + 1].reshape(kv * hd, d).T.reshape(d, kv, hd)]

    def to_hf(a):
        q = a[0].reshape(d, h * hd).T.reshape(kv, g, hd, d)
        k = a[1].reshape(d, kv * hd).T.reshape(kv, 1, hd, d)
        v = a[2].reshape(d, kv * hd).T.reshape(kv, 1, hd, d)
        return [np.concatenate([q, k, v], axis=1).reshape(-1, d)]

    return to_jax, to_hf


def _fused_rows(d: int, parts: list[tuple[int, tuple[int, ...]]]):
    """torch [sum(rows), d] split by rows <-> several ours [d, *shape]."""
    splits = np.cumsum([r for r, _ in parts])[:-1]

    def to_jax(a):
        return [w.T.reshape((d,) + shape)
                for w, (_, shape) in zip(np.split(a[0], splits, axis=0), parts, strict=True)]

    def to_hf(a):
        return [np.concatenate([x.reshape(d, -1).T for x in a], axis=0)]

    return to_jax, to_hf


def llm_rules(cfg: LLMConfig, *, body: str, head: str, internlm2_names: bool | None = None
              ) -> list[Rule]:
    """`body` prefixes the decoder (`language_model.model.`), `head` is the lm_head tensor stem."""
    d, h, kv, hd, i_dim, v = (cfg.hidden_size, cfg.num_heads, cfg.num_kv_heads, cfg.head_size,
                              cfg.intermediate_size, cfg.vocab_size)
    ilm = cfg.family == "internlm2" if internlm2_names is None else internlm2_names
    rules = [
        _rule([body + ("tok_embeddings.weight" if ilm else "embed_tokens.weight")],
              [Target(("llm", "embed_tokens"))], _same(), [(v, d)]),
        _rule([body + "norm.weight"], [Target(("llm", "norm", "weight"))], _same(), [(d,)]),
    ]
    if not cfg.tie_word_embeddings:
        rules.append(_rule([head + ".weight"], [Target(("llm", "lm_head"))],
                           ((lambda a: [a[0].T]), (lambda a: [a[0].T])), [(v, d)]))
    stack = ("llm", "layers", "layers")
    for i in range(cfg.num_layers):
        t = _stack_path(stack, i)
        lp = f"{body}layers.{i}."
        if ilm:
            rules.append(_rule([lp + "attention.wqkv.weight"],
                               [t(("q_proj", "kernel")), t(("k_proj", "kernel")),
                                t(("v_proj", "kernel"))],
                               _internlm2_wqkv(cfg), [((h + 2 * kv) * hd, d)]))
            o_name, norms = lp + "attention.wo.weight", ("attention_norm", "ffn_norm")
            mlp = {"gate_proj": "feed_forward.w1", "up_proj": "feed_forward.w3",
                   "down_proj": "feed_forward.w2"}
        elif cfg.family == "phi3":
            rules.append(_rule([lp + "self_attn.qkv_proj.weight"],
                               [t(("q_proj", "kernel")), t(("k_proj", "kernel")),
                                t(("v_proj", "kernel"))],
                               _fused_rows(d, [(h * hd, (h, hd)), (kv * hd, (kv, hd)),
                                               (kv * hd, (kv, hd))]),
                               [((h + 2 * kv) * hd, d)]))
            rules.append(_rule([lp + "mlp.gate_up_proj.weight"],
                               [t(("gate_proj", "kernel")), t(("up_proj", "kernel"))],
                               _fused_rows(d, [(i_dim, (i_dim,)), (i_dim, (i_dim,))]),
                               [(2 * i_dim, d)]))
            o_name = lp + "self_attn.o_proj.weight"
            norms = ("input_layernorm", "post_attention_layernorm")
            mlp = {"down_proj": "mlp.down_proj"}
        else:
            for x, heads in (("q", h), ("k", kv), ("v", kv)):
                rules.append(_rule([lp + f"self_attn.{x}_proj.weight"],
                                   [t((f"{x}_proj", "kernel"))], _linear(d, (heads, hd)),
                                   [(heads * hd, d)]))
                if cfg.qkv_bias:
                    rules.append(_rule([lp + f"self_attn.{x}_proj.bias"],
                                       [t((f"{x}_proj", "bias"))], _reshape((heads, hd)),
                                       [(heads * hd,)]))
            if cfg.qk_norm:  # Qwen3: one [head_dim] weight per projection, shared by heads
                for x in ("q", "k"):
                    rules.append(_rule([lp + f"self_attn.{x}_norm.weight"],
                                       [t((f"{x}_norm", "weight"))], _same(), [(hd,)]))
            o_name = lp + "self_attn.o_proj.weight"
            norms = ("input_layernorm", "post_attention_layernorm")
            mlp = {"gate_proj": "mlp.gate_proj", "up_proj": "mlp.up_proj",
                   "down_proj": "mlp.down_proj"}
        if cfg.qkv_bias and (ilm or cfg.family == "phi3"):
            raise ValueError(f"qkv_bias is not supported for the {cfg.family} checkpoint layout")
        rules.append(_rule([o_name], [t(("o_proj", "kernel"))], _linear_in((h, hd), d),
                           [(d, h * hd)]))
        for ours, theirs in mlp.items():
            if ours == "down_proj":
                rules.append(_rule([lp + theirs + ".weight"], [t((ours, "kernel"))],
                                   _linear(i_dim, (d,)), [(d, i_dim)]))
            else:
                rules.append(_rule([lp + theirs + ".weight"], [t((ours, "kernel"))],
                                   _linear(d, (i_dim,)), [(i_dim, d)]))
        for ours, theirs in zip(("input_norm", "post_attention_norm"), norms, strict=True):
            rules.append(_rule([lp + theirs + ".weight"], [t((ours, "weight"))], _same(),
                               [(d,)]))
    return rules


def _llm_names(layout: str, family: str) -> tuple[str, str, bool]:
    """(decoder prefix, lm_head stem, InternLM2 names?) of the LLM inside a whole checkpoint."""
    if layout not in LAYOUTS:
        raise ValueError(f"unknown checkpoint layout {layout!r}; expected one of {LAYOUTS}")
    if layout == "original":
        ilm = family == "internlm2"
        return "language_model.model.", ("language_model.output" if ilm else
                                         "language_model.lm_head"), ilm
    return "model.language_model.", "lm_head", False


def model_rules(cfg: ModelConfig, layout: str) -> list[Rule]:
    """Every rule of a whole InternVL checkpoint in `layout`."""
    body, head, ilm = _llm_names(layout, cfg.llm.family)
    llm = llm_rules(cfg.llm, body=body, head=head, internlm2_names=ilm)
    return vision_rules(cfg.vision, layout) + projector_rules(cfg, layout) + llm


# transformers saves InternVLForConditionalGeneration under the older Llava-style names below and
# maps them back on load, so native checkpoints on disk come in either form; the rules use the
# in-memory (module) names.
NATIVE_SAVED_PREFIXES = (("model.language_model.", "language_model.model."),
                         ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("lm_head.", "language_model.lm_head."))


def native_module_name(name: str) -> str:
    """A native checkpoint's tensor name in module form (saved-form names are translated)."""
    for module, saved in NATIVE_SAVED_PREFIXES:
        if name.startswith(saved):
            return module + name[len(saved):]
    return name


def native_saved_name(name: str) -> str:
    """The name transformers' `save_pretrained` writes for module-form `name`."""
    for module, saved in NATIVE_SAVED_PREFIXES:
        if name.startswith(module):
            return saved + name[len(module):]
    return name


def key_tensor_names(layout: str, family: str) -> dict[str, str]:
    """Tensors whose shapes or presence settle config values (vocab, tying, biases, grid)."""
    body, head, ilm = _llm_names(layout, family)
    vision = ("vision_model.embeddings.position_embedding" if layout == "original" else
              "model.vision_tower.embeddings.position_embeddings")
    return {"embed": body + ("tok_embeddings.weight" if ilm else "embed_tokens.weight"),
            "lm_head": head + ".weight",
            "q_bias": body + "layers.0.self_attn.q_proj.bias",
            "position_embedding": vision}


def layer_stacks(rules: list[Rule]) -> dict[ParamPath, int]:
    """Each layer stack's path in our tree -> its number of layers."""
    stacks: dict[ParamPath, int] = {}
    for rule in rules:
        for t in rule.targets:
            if t.stack is not None and t.layer is not None:
                stacks[t.stack] = max(stacks.get(t.stack, 0), t.layer + 1)
    return stacks


def target_key(target: Target, scan: bool) -> tuple[ParamPath, int | None]:
    """(path in our nnx state, index on the leading layer axis or None)."""
    if target.layer is None:
        return target.path, None
    assert target.stack is not None, "a layer target names its stack"
    if scan:
        return target.stack + target.path, target.layer
    return target.stack + (target.layer,) + target.path, None
