"""LoRA parity with peft: LoRA (rank 8, alpha 16) on the LLM's attention and MLP projections of
transformers' InternVL, base weights frozen. Same base weights and adapter factors on both
sides: the logits, the gradients of every LoRA factor (our real step, InternVL's loss), and the
merged weights (our merge for export vs peft's merge_and_unload) agree.

The factor layout (peft lora_A [r, in], lora_B [out, r]; ours lora_a [in..., r], lora_b
[r, out...] with a leading layer axis) is written out here, independently of the package.
"""

import numpy as np
import peft
import torch
import transformers
from flax import nnx

from mini_internvl_jax.convert.mapping import model_rules
from mini_internvl_jax.models.lora import LoRAConfig, LoRADense, apply_lora, merge_lora
from tests.helpers import hf_reference as ref
from tests.helpers import parity as P

RANK, ALPHA = 8, 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PEFT_PREFIX = "base_model.model."


def _layer_module(name: str) -> str:
    return "self_attn" if name in ("q_proj", "k_proj", "v_proj", "o_proj") else "mlp"


def _peft_name(layer: int, target: str, factor: str) -> str:
    return (f"{PEFT_PREFIX}model.language_model.layers.{layer}.{_layer_module(target)}."
            f"{target}.lora_{factor}.default.weight")


def _adapters(model) -> dict[str, LoRADense]:
    return {path[-1]: node for path, node in nnx.iter_graph(model)
            if isinstance(node, LoRADense)}


def build_pair(seed: int = 0):
    hf_cfg, cfg = ref.internvl_pair("qwen2")
    base = ref.randomize_(transformers.InternVLForConditionalGeneration(hf_cfg))
    rules = model_rules(cfg, "native")
    base_sd = {k: v.clone() for k, v in base.state_dict().items()}
    pcfg = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, bias="none",
                           target_modules=r".*language_model.*\.(" + "|".join(TARGETS) + ")")
    theirs = peft.get_peft_model(base, pcfg)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # peft starts B at zero; non-zero factors make every check count
        for n, p in theirs.named_parameters():
            if "lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    ours = P.model_from_torch(cfg, rules, base_sd, extra=lambda m: apply_lora(
        m, LoRAConfig(rank=RANK, alpha=ALPHA), nnx.Rngs(1)))
    sd = dict(theirs.named_parameters())
    for target, node in _adapters(ours).items():
        layers = node.lora_a.shape[0]
        a = np.stack([sd[_peft_name(i, target, "A")].detach().numpy().T for i in range(layers)])
        b = np.stack([sd[_peft_name(i, target, "B")].detach().numpy().T for i in range(layers)])
        node.lora_a[...] = a.reshape(node.lora_a.shape)
        node.lora_b[...] = b.reshape(node.lora_b.shape)
    return theirs, ours, cfg, rules


def test_lora_forward_gradients_and_merge_match_peft():
    theirs, ours, cfg, rules = build_pair()
    assert set(_adapters(ours)) == set(TARGETS)
    batch, micro = P.multimodal_batch()

    # forward
    want = theirs(input_ids=batch["input_ids"], pixel_values=batch["pixel_values"]).logits
    got = np.asarray(ours(micro["input_ids"], micro["pixel_values"], micro["image_flags"]))
    fwd = P.rel_err(got, want.detach().numpy())

    # gradients of the LoRA factors (everything else is frozen on both sides)
    P.token_mean_ce(want, batch["labels"]).backward()
    trainer = P.Trainer(ours, frozenset({"vision", "projector", "llm"}))
    trainer.step(P.stack_micro([micro]))
    grads = trainer.grads()
    assert all(p[-1] in ("lora_a", "lora_b") for p in grads)
    got_g, want_g = {}, {}
    for path, g in grads.items():
        target, factor = path[-2], path[-1][-1].upper()
        for i in range(g.shape[0]):
            name = _peft_name(i, target, factor)
            got_g[name] = g[i].reshape(-1, RANK).T if factor == "A" else g[i].reshape(RANK, -1).T
    want_g = {n: p.grad.numpy() for n, p in theirs.named_parameters() if p.requires_grad}
    grad_err, grad_name = P.worst(got_g, want_g)

    # merged weights: our export merge vs peft's merge_and_unload
    merged = trainer.model()
    assert merge_lora(merged) == len(TARGETS)
    got_w = P.to_torch_names(P.flat(nnx.state(merged, nnx.Param)), rules)
    want_w = {k: v.numpy() for k, v in theirs.merge_and_unload().state_dict().items()}
    merge_err, merge_name = P.worst(got_w, want_w, floor=0.0)
    print(f"LoRA: logits {fwd:.2e}, factor gradients {grad_err:.2e} ({grad_name}), "
          f"merged weights {merge_err:.2e} ({merge_name})")
    assert fwd <= 1e-4
    assert grad_err <= 1e-4, grad_name
    assert merge_err <= 1e-5, merge_name
