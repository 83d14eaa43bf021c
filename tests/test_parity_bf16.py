"""bf16 mixed precision: the W1 recipe (stage 2, ViT frozen, bfloat16 compute over float32
master weights, layer scan + full remat, 4 accumulated micro-batches, AdamW + warmup-cosine +
clip 1.0) on a tiny model for 50 steps, against PyTorch autocast(bfloat16) over float32 weights
with the same optimizer recipe. The two loss curves stay within 2e-2 relative at every step.
"""

import numpy as np
import transformers

from mini_internvl_jax.convert.mapping import model_rules
from mini_internvl_jax.train.config import OptimConfig
from tests.helpers import hf_reference as ref
from tests.helpers import parity as P

STEPS, ACCUM = 50, 4


def test_bf16_loss_curve_matches_torch_autocast():
    hf_cfg, cfg = ref.internvl_pair("qwen2")
    torch_model = ref.randomize_(transformers.InternVLForConditionalGeneration(hf_cfg))
    torch_model.train()
    P.freeze_torch(torch_model, ("model.vision_tower.",))
    rules = model_rules(cfg, "native")
    optim = OptimConfig(lr=2e-3, warmup_steps=5, weight_decay=0.01, clip_norm=1.0,
                        grad_accum=ACCUM)
    model = P.model_from_torch(cfg, rules, torch_model.state_dict(), dtype="bfloat16")
    trainer = P.Trainer(model, frozenset({"vision"}), optim, STEPS)

    micro = [P.multimodal_batch(seed=s % 11) for s in range(STEPS * ACCUM)]
    ours = np.array([float(trainer.step(P.stack_micro([m[1] for m in micro[k:k + ACCUM]]))
                           ["loss"]) for k in range(0, len(micro), ACCUM)])
    theirs = np.array(P.torch_train(
        torch_model, [P.concat_micro([m[0] for m in micro[k:k + ACCUM]])
                      for k in range(0, len(micro), ACCUM)],
        lr=optim.lr, warmup=5, weight_decay=0.01, clip=1.0, autocast=True))
    spread = np.abs(ours - theirs) / np.abs(theirs)
    print(f"bf16: loss {theirs[0]:.3f} -> {theirs[-1]:.3f}; relative spread max "
          f"{spread.max():.2e} (step {spread.argmax()}), median {np.median(spread):.2e}")
    assert theirs[-1] < 0.7 * theirs[0]  # both actually train
    assert spread.max() <= 2e-2, spread
