"""Gradient parity with transformers' InternVLForConditionalGeneration (torch autograd, float32).

A multimodal batch (two samples of different lengths, three real tiles and a padding tile) goes
through our real training step; its gradient of every trainable parameter, renamed to PyTorch
names through the converter's rules, must equal torch's gradient of InternVL's loss (token-mean
cross-entropy over the supervised tokens) within 1e-4 relative, tensor by tensor.
"""

import pytest
import transformers

from mini_internvl_jax.convert.mapping import model_rules
from mini_internvl_jax.train.state import split_params
from tests.helpers import hf_reference as ref
from tests.helpers import parity as P

VISION, PROJECTOR, LLM = "model.vision_tower.", "model.multi_modal_projector.", \
    ("model.language_model.", "lm_head.")
TOL = 1e-4


def run_case(text: str, frozen: frozenset[str], *, select_layer: int = -1, seq_len: int = 24,
             vision_layers: int = 2) -> tuple[float, str, int]:
    hf_cfg, cfg = ref.internvl_pair(text, vision_layers=vision_layers)
    hf_cfg.vision_feature_layer = select_layer
    cfg = cfg.replace(select_layer=select_layer)
    torch_model = ref.randomize_(transformers.InternVLForConditionalGeneration(hf_cfg))
    prefixes = {"vision": (VISION,), "projector": (PROJECTOR,), "llm": LLM}
    P.freeze_torch(torch_model, tuple(p for part in frozen for p in prefixes[part]))
    theirs, micro = P.multimodal_batch(seq_len=seq_len)

    torch_model.train()  # no dropout in these configs; train() as the reference trainer
    logits = torch_model(input_ids=theirs["input_ids"],
                         pixel_values=theirs["pixel_values"]).logits
    P.token_mean_ce(logits, theirs["labels"]).backward()
    want = P.torch_grads(torch_model)

    rules = model_rules(cfg, "native")
    model = P.model_from_torch(cfg, rules, torch_model.state_dict())
    trainer = P.Trainer(model, frozen)
    trainer.step(P.stack_micro([micro]))
    got = P.to_torch_names(trainer.grads(), rules)
    err, name = P.worst(got, want)
    return err, name, len(want)


CASES = {
    # name: (text family, frozen parts, select_layer)
    "stage1_mlp1_only": ("qwen2", frozenset({"vision", "llm"}), -1),
    "stage2_full": ("qwen2", frozenset(), -1),
    "stage2_frozen_vit": ("qwen2", frozenset({"vision"}), -1),
    "internlm2_as_llama": ("llama", frozenset(), -1),
    "phi3_longrope": ("phi3", frozenset(), -1),
    "select_layer_-2": ("qwen2", frozenset(), -2),
}


# InternLM2-as-Llama and select_layer -2 differ from stage2_full only in forward code that
# test_model_parity checks against transformers; run them with -m slow.
SLOW = {"internlm2_as_llama", "select_layer_-2"}


@pytest.mark.parametrize("case", [pytest.param(c, marks=pytest.mark.slow) if c in SLOW else c
                                  for c in CASES])
def test_gradients_match_torch(case):
    text, frozen, select = CASES[case]
    # Phi-3: 40 positions > original_max_position_embeddings 32, so LongRoPE's long factors act.
    err, name, n = run_case(text, frozen, select_layer=select,
                            seq_len=40 if text == "phi3" else 24,
                            vision_layers=3 if select == -2 else 2)
    print(f"{case}: {n} trainable tensors, max relative gradient error {err:.2e} ({name})")
    assert err <= TOL, f"{case}: {name} relative error {err}"


def test_trainable_sets_match_the_stages():
    """Stage 1 trains mlp1's six tensors only; a frozen ViT leaves mlp1 + LLM; the names of
    what we train equal torch's requires_grad set under the same freezing."""
    hf_cfg, cfg = ref.internvl_pair("qwen2")
    torch_model = transformers.InternVLForConditionalGeneration(hf_cfg)
    rules = model_rules(cfg, "native")
    model = P.model_from_torch(cfg, rules, torch_model.state_dict())
    for frozen, prefixes in ((frozenset({"vision", "llm"}), (VISION,) + LLM),
                             (frozenset({"vision"}), (VISION,))):
        P.freeze_torch(torch_model, prefixes)
        want = {n for n, p in torch_model.named_parameters() if p.requires_grad}
        _, trainable, _, _ = split_params(model, frozen)
        assert set(P.to_torch_names(P.flat(trainable), rules)) == want
    assert len(want) > 6
