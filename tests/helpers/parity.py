"""Shared pieces of the training-parity tests (tests/test_parity_*.py).

Our side always runs the real training step (`make_step_fn`); gradients are read out of it with
`grad_probe`, an optax transformation whose state is the gradient it was given. Gradients and
weights are compared under PyTorch names through the converter's rules (`Rule.to_hf`), so the
name and layout mapping is read from the table, not from an inverse we wrote for the test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import torch
import transformers
from flax import nnx

from mini_internvl_jax.batch import Batch
from mini_internvl_jax.config import ComputeConfig, ModelConfig
from mini_internvl_jax.convert.apply import fill_from_rules
from mini_internvl_jax.convert.mapping import Rule, target_key
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.train.config import OptimConfig
from mini_internvl_jax.train.optim import make_optimizer, make_schedule
from mini_internvl_jax.train.state import TrainState, split_params
from mini_internvl_jax.train.step import make_step_fn
from tests.helpers import hf_reference as ref
from tests.helpers.torch_rules import torch_state_reader

IGNORE = -100  # PyTorch's cross-entropy ignore_index, as the reference uses it


def model_factory(cfg: ModelConfig, *, dtype: str = "float32", scan: bool = True,
                  remat: str = "full"):
    """The one place the parity tests construct a model (training-time compute knobs)."""
    compute = ComputeConfig(dtype=dtype, param_dtype="float32", scan_layers=scan, remat=remat,
                            check_image_tokens=False)
    return lambda: InternVLModel(cfg, compute, rngs=nnx.Rngs(0))


def model_from_torch(cfg: ModelConfig, rules: list[Rule], state_dict, *, extra=None,
                     **knobs) -> InternVLModel:
    """Our model holding a torch model's weights. Built abstractly and filled from numpy (no
    random init, no per-op compiles); every parameter must come from a rule. `extra(model)`
    may modify the abstract model first (LoRA adapters, filled by the caller)."""
    scan = knobs.get("scan", True)
    make = model_factory(cfg, **knobs)

    def build():
        model = make()
        if extra is not None:
            extra(model)
        return model

    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(build)
    graphdef, state = nnx.split(abstract)
    specs = {tuple(p): v for p, v in nnx.to_flat_state(state)}
    filled = fill_from_rules(rules, torch_state_reader(state_dict), specs, scan=scan)
    missing = [p for p, v in nnx.to_flat_state(state)
               if p not in filled and isinstance(v, nnx.Param) and extra is None]
    assert not missing, f"no rule fills {missing[:5]}"
    values = [(p, v.replace(jnp.asarray(filled[p])) if p in filled else
               v.replace(jnp.zeros(v.shape, v.dtype)))
              for p, v in nnx.to_flat_state(state)]
    return nnx.merge(graphdef, nnx.from_flat_state(values))


def grad_probe() -> optax.GradientTransformation:
    """Keeps the gradient it is given as its state and leaves the parameters unchanged."""
    return optax.GradientTransformation(
        lambda params: jax.tree.map(jnp.zeros_like, params),
        lambda grads, state, params=None: (jax.tree.map(jnp.zeros_like, grads), grads))


def train_state(params, frozen, rest, tx) -> TrainState:
    key = jax.random.key_data(jax.random.key(0)).astype(jnp.uint32)
    zero = jnp.zeros((), jnp.int32)
    return TrainState(params=params, opt_state=tx.init(params), step=zero, rng=key,
                      bad_steps=zero, skipped=zero, frozen=frozen, rest=rest)


class Trainer:
    """Our real step (jitted, no mesh) over a model split into trainable / frozen / rest.

    With `optim` and `total_steps` it trains with our AdamW + warmup-cosine (train/optim.py);
    without, the optimizer is `grad_probe` and `grads()` returns the step's gradient."""

    def __init__(self, model, frozen_components, optim: OptimConfig | None = None,
                 total_steps: int = 1, *, loss_chunk: int = 16, packed: bool = True):
        graphdef, params, frozen, rest = split_params(model, frozen_components)
        self.graphdef = graphdef
        if optim is None:
            tx, schedule = grad_probe(), (lambda n: 0.0)
        else:
            tx = make_optimizer(optim, total_steps, params)
            schedule = make_schedule(optim, total_steps)
        self.state = train_state(params, frozen, rest, tx)
        step = make_step_fn(graphdef, tx, schedule, loss_chunk=loss_chunk, drop_path=False,
                            lora_dropout=False, packed=packed)
        self._step = jax.jit(step)

    def step(self, batch: dict[str, np.ndarray]) -> dict:
        """One optimizer step on a batch with a leading micro-batch axis."""
        self.state, metrics = self._step(self.state,
                                         Batch.of({k: jnp.asarray(v) for k, v in batch.items()}))
        return jax.device_get(metrics)

    def grads(self) -> dict[tuple, np.ndarray]:
        """The last step's gradient (grad_probe's state)."""
        return flat(self.state.opt_state)

    def params(self) -> dict[tuple, np.ndarray]:
        return flat(self.state.params)

    def model(self):
        return nnx.merge(self.graphdef, self.state.params, self.state.frozen, self.state.rest)


def flat(state) -> dict[tuple, np.ndarray]:
    """{our parameter path: numpy array} of an nnx State (Variables unwrapped)."""
    return {tuple(p): np.asarray(v.get_value() if isinstance(v, nnx.Variable) else v)
            for p, v in nnx.to_flat_state(state)}


def to_torch_names(tree: dict[tuple, np.ndarray], rules: list[Rule], scan: bool = True
                   ) -> dict[str, np.ndarray]:
    """Our arrays (grads or weights) under the PyTorch names, via each rule's `to_hf`.

    Rules whose targets are not all in `tree` (frozen parts) are left out."""
    out = {}
    for rule in rules:
        keys = [target_key(t, scan) for t in rule.targets]
        if not all(path in tree for path, _ in keys):
            continue
        parts = [tree[path] if layer is None else tree[path][layer] for path, layer in keys]
        for name, value in zip(rule.sources, rule.to_hf(parts), strict=True):
            out[name] = np.asarray(value)
    return out


def rel_err(ours, theirs) -> float:
    """max |ours - theirs| / max |theirs| (absolute when the reference is all zeros)."""
    ours, theirs = np.asarray(ours, np.float64), np.asarray(theirs, np.float64)
    scale = float(np.max(np.abs(theirs))) if theirs.size else 0.0
    return float(np.max(np.abs(ours - theirs))) / (scale if scale > 0 else 1.0)


def worst(ours: dict[str, np.ndarray], theirs: dict[str, np.ndarray], floor: float = 1e-4
          ) -> tuple[float, str]:
    """(largest per-tensor relative error, its name) over the same set of names.

    A tensor's scale is its own largest entry, but at least `floor` x the largest entry of all
    tensors: some gradients are zero in exact arithmetic (attention's key bias: softmax ignores
    a per-query constant) and hold only rounding noise (~1e-10) on both sides."""
    assert sorted(ours) == sorted(theirs), (sorted(set(ours) ^ set(theirs)))[:10]
    top = max(float(np.max(np.abs(v))) for v in theirs.values())
    errs = {k: float(np.max(np.abs(np.asarray(ours[k], np.float64) - theirs[k]))) /
            max(float(np.max(np.abs(theirs[k]))), floor * top) for k in theirs}
    name = max(errs, key=errs.get)
    return errs[name], name


# --------------------------------------------------------------------------- batches


def sample_ids(rng: np.random.RandomState, length: int, tiles: int, per_tile: int,
               prompt: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """(ids, HF-style labels) of one sample: `prompt` text ids, the image placeholders, text.

    Labels follow InternVL: the prompt and the image tokens are masked, the answer supervised;
    they are not shifted (the token itself is its own label, as in HF `labels`)."""
    ids = rng.randint(10, 290, size=length)
    ids[prompt:prompt + per_tile * tiles] = ref.IMAGE_TOKEN
    labels = ids.copy()
    labels[:prompt + per_tile * tiles + 1] = IGNORE  # the first text token after the image too
    return ids.astype(np.int64), labels.astype(np.int64)


def padded_batch(samples: list[tuple[np.ndarray, np.ndarray]], seq_len: int):
    """HF rows: right-padded ids (0) and labels (-100)."""
    ids = np.zeros((len(samples), seq_len), np.int64)
    labels = np.full((len(samples), seq_len), IGNORE, np.int64)
    for r, (i, lab) in enumerate(samples):
        ids[r, :len(i)], labels[r, :len(lab)] = i, lab
    return ids, labels


def ours_from_rows(ids: np.ndarray, labels: np.ndarray, lengths: list[int],
                   pixels: np.ndarray, flags: np.ndarray, weights: np.ndarray | None = None
                   ) -> dict[str, np.ndarray]:
    """One micro-batch in our contract from HF rows: labels shifted left (label[t] is the
    target of position t), one segment per row, loss weight 1 per supervised token."""
    b, s = ids.shape
    shifted = np.full((b, s), IGNORE, np.int32)
    shifted[:, :-1] = labels[:, 1:]
    seg = np.zeros((b, s), np.int32)
    pos = np.zeros((b, s), np.int32)
    for r, n in enumerate(lengths):
        seg[r, :n] = 1
        pos[r, :n] = np.arange(n)
    w = (shifted != IGNORE).astype(np.float32) if weights is None else weights
    return {"input_ids": ids.astype(np.int32), "labels": shifted, "loss_weights": w,
            "positions": pos, "segment_ids": seg, "pixel_values": pixels.astype(np.float32),
            "image_flags": flags.astype(np.int32)}


def stack_micro(micros: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Micro-batches on a new leading axis (the step's grad-accumulation axis)."""
    return {k: np.stack([m[k] for m in micros]) for k in micros[0]}


def multimodal_batch(seed: int = 0, seq_len: int = 24, per_tile: int = 4):
    """Two samples of different lengths (2 tiles + 1 tile), a padding tile in the buffer.

    Returns (torch inputs {input_ids, labels, pixel_values}, our micro-batch)."""
    rng = np.random.RandomState(seed)
    lengths = [seq_len, seq_len - 7 - seed % 5]  # supervised counts differ by row and batch
    samples = [sample_ids(rng, lengths[0], 2, per_tile), sample_ids(rng, lengths[1], 1, per_tile)]
    ids, labels = padded_batch(samples, seq_len)
    px = rng.randn(3, 3, 56, 56).astype(np.float32)
    buffer = np.concatenate([px[:2], np.zeros_like(px[:1]), px[2:]])  # padding tile
    flags = np.array([1, 1, 0, 1], np.int32)
    theirs = {"input_ids": torch.tensor(ids), "labels": torch.tensor(labels),
              "pixel_values": torch.tensor(px)}
    return theirs, ours_from_rows(ids, labels, lengths, buffer, flags)


def token_mean_ce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """InternVLChatModel's loss: shift, cross-entropy averaged over the supervised tokens."""
    return torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]).float(), labels[:, 1:].reshape(-1),
        ignore_index=IGNORE)


def torch_grads(model: torch.nn.Module) -> dict[str, np.ndarray]:
    """Gradients of every trainable parameter (None = unused = zero)."""
    return {n: (np.zeros(p.shape, np.float32) if p.grad is None else p.grad.numpy().copy())
            for n, p in model.named_parameters() if p.requires_grad}


def freeze_torch(model: torch.nn.Module, frozen_prefixes: tuple[str, ...]) -> None:
    for n, p in model.named_parameters():
        p.requires_grad_(not n.startswith(frozen_prefixes))


def concat_micro(micros: list[dict]) -> dict[str, torch.Tensor]:
    """Torch inputs of several micro-batches as one big batch (rows and tiles in order)."""
    return {k: torch.cat([m[k] for m in micros]) for k in micros[0]}


def original_decay_names(model: torch.nn.Module) -> set[str]:
    """The parameters InternVL2's fine-tuning decayed, written out from transformers 4.37.2's
    Trainer (`get_parameter_names(model, ALL_LAYERNORM_LAYERS)` minus names containing
    "bias"): every parameter except biases and those of `nn.LayerNorm` modules. InternVL's own
    RMSNorm classes (Qwen2, InternLM2, Phi-3) were not registered in ALL_LAYERNORM_LAYERS, so
    their weights were decayed; LlamaRMSNorm was, but no InternVL2 model uses it (the tiny
    Llama here stands in for InternLM2, so its RMSNorm counts as decayed)."""
    layer_norms = [n for n, m in model.named_modules() if isinstance(m, torch.nn.LayerNorm)]
    return {n for n, _ in model.named_parameters() if "bias" not in n
            and not any(n.startswith(ln + ".") for ln in layer_norms)}


def torch_train(model: torch.nn.Module, batches: list[dict[str, torch.Tensor]], *, lr: float,
                warmup: int, weight_decay: float, clip: float, autocast: bool = False
                ) -> list[float]:
    """The PyTorch InternVL recipe, one optimizer step per batch: InternVL2's no-decay rule
    (`original_decay_names`), torch AdamW, transformers' warmup-cosine, clip_grad_norm_;
    optionally bf16 autocast over float32 master weights."""
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    decay = original_decay_names(model)
    opt = torch.optim.AdamW(
        [{"params": [p for n, p in named if n in decay], "weight_decay": weight_decay},
         {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}],
        lr=lr, betas=(0.9, 0.999), eps=1e-8)
    sched = transformers.get_cosine_schedule_with_warmup(opt, warmup, len(batches))
    losses = []
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            logits = model(input_ids=batch["input_ids"],
                           pixel_values=batch["pixel_values"]).logits
        loss = token_mean_ce(logits, batch["labels"])
        opt.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for _, p in named], clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
    return losses
