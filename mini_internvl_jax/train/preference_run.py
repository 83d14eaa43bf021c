"""How the trainer runs the MPO stage (`TrainConfig.preference` set): batch shapes with the
preference fields, the jitted step holding the reference parameters, the data iterator, and
the first pass that precomputes and stores reference log-probs.

The step keeps the trainer's call `step_fn(state, batch)` (and `.lower(...)` for AOT); a
preference batch is a dict of the `Batch` fields plus the pair fields. `PreferenceStep` passes
the reference parameters as a jit argument itself, so they live on the mesh once, sharded like
the trainable parameters, and are never donated or saved (a resumed run rebuilds them from
`init_from`, as trl reloads its reference model).
"""

from __future__ import annotations

import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
from etils import epath
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from mini_internvl_jax import batch as contract
from mini_internvl_jax import fileio
from mini_internvl_jax.data.preference import (
    PAIR_FIELDS,
    build_preference_dataset,
    pairs_per_micro_batch,
)
from mini_internvl_jax.errors import UserError
from mini_internvl_jax.sharding import logical_to_spec
from mini_internvl_jax.train.config import TrainConfig
from mini_internvl_jax.train.preference_step import (
    initial_extra,
    make_preference_step_fn,
    sequence_logps,
)


class ReferenceLogpsError(UserError):
    """The stored reference log-probs are missing, unreadable or do not cover the data."""


def batch_dtypes() -> dict:
    return {**{k: f.dtype for k, f in contract.FIELDS.items()},
            **{k: v[0] for k, v in PAIR_FIELDS.items()}}


def global_shapes(cfg: TrainConfig, model_cfg) -> dict[str, tuple[int, ...]]:
    """The training-batch shapes plus the preference fields."""
    assert cfg.data is not None or cfg.preference is not None
    shapes = contract.BatchSpec(
        rows=cfg.micro_batch_size, seq_len=cfg.seq_len, tiles=cfg.max_tiles,
        image_size=model_cfg.vision.image_size, channels=model_cfg.vision.num_channels,
        grad_accum=cfg.optim.grad_accum, num_image_tokens=model_cfg.num_image_tokens
    ).global_shapes()
    a, b, s = shapes["input_ids"]
    pairs = pairs_per_micro_batch(b, cfg.data) if cfg.data is not None else 4 * b
    shapes.update(pair_slot=(a, b, s), vision_index=(a, b, s), ref_logps=(a, pairs, 2))
    return shapes


def batch_shardings(mesh, shapes: dict) -> dict[str, NamedSharding]:
    axes = {**{k: f.axes for k, f in contract.FIELDS.items()},
            **{k: v[1] for k, v in PAIR_FIELDS.items()}}
    return {k: NamedSharding(mesh, logical_to_spec((None, *axes[k]), shape, mesh))
            for k, shape in shapes.items()}


def batch_abstract(cfg: TrainConfig, model_cfg, shardings: dict) -> dict:
    dtypes = batch_dtypes()
    return {k: jax.ShapeDtypeStruct(s, dtypes[k], sharding=shardings[k])
            for k, s in global_shapes(cfg, model_cfg).items()}


def to_global(host: dict, shardings: dict) -> dict:
    """Per-host arrays -> global arrays, every field the step reads (pair fields included)."""
    return {k: jax.make_array_from_process_local_data(sh, host[k])
            for k, sh in shardings.items()}


class PreferenceStep:
    """The jitted MPO step with the reference parameters bound (None: precomputed)."""

    def __init__(self, jitted, ref_params):
        self.jitted, self.ref = jitted, ref_params

    def __call__(self, state, batch):
        return self.jitted(state, batch, self.ref)

    def lower(self, state, batch):
        return self.jitted.lower(state, batch, self.ref)


def build_step(cfg: TrainConfig, model_cfg, mesh, graphdef, tx, schedule, trainable, state_sh,
               batch_sh, *, abstract: bool) -> PreferenceStep:
    pref = cfg.preference
    assert pref is not None
    fn = make_preference_step_fn(graphdef, tx, schedule, pref, loss_chunk=cfg.loss_chunk,
                                 drop_path=model_cfg.vision.drop_path_rate > 0,
                                 lora_dropout=cfg.lora.rank > 0 and cfg.lora.dropout > 0,
                                 packed=cfg.packed, compute_dtype=cfg.model_compute.dtype)
    ref_sh = state_sh.params if pref.reference == "model" else None
    jitted = jax.jit(fn, in_shardings=(state_sh, batch_sh, ref_sh),
                     out_shardings=(state_sh, NamedSharding(mesh, P())), donate_argnums=(0,))
    if pref.reference != "model":
        ref = None
    elif abstract:
        ref = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                           trainable, state_sh.params)
    else:  # the initial trainable parameters, a copy the optimizer never touches
        ref = jax.jit(lambda t: jax.tree.map(jnp.copy, t), out_shardings=state_sh.params)(
            trainable)
    return PreferenceStep(jitted, ref)


def initial_state_extra(mesh) -> dict:
    rep = NamedSharding(mesh, P())
    return jax.tree.map(lambda x: jax.device_put(x, rep), initial_extra())


def abstract_state_extra() -> dict:
    return jax.eval_shape(initial_extra)


# ------------------------------------------------------------------ data


def ref_logps_path(cfg: TrainConfig) -> epath.Path:
    pref = cfg.preference
    assert pref is not None and cfg.data is not None
    if pref.ref_logps_path:
        return epath.Path(pref.ref_logps_path)
    return epath.Path(cfg.data.meta_path).parent / "ref_logps.json"


def stored_ref_table(cfg: TrainConfig):
    """The stored reference log-probs when the run uses them and they exist, else None."""
    pref = cfg.preference
    if pref is None or pref.reference != "precomputed" or not ref_logps_path(cfg).exists():
        return None
    return load_ref_table(ref_logps_path(cfg))


def load_ref_table(path: epath.Path) -> dict[tuple[str, int], tuple[float, float]]:
    try:
        raw = json.loads(path.read_text())
        return {(src, int(line)): (float(c), float(r)) for src, line, c, r in raw["pairs"]}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ReferenceLogpsError(f"{path}: cannot read stored reference log-probs ({e}); "
                                  "delete it to recompute them") from None


def make_iterator(cfg: TrainConfig, model_cfg, *, rows: int, tiles: int, ref_table=None,
                  single_pass: bool = False):
    assert cfg.data is not None and cfg.tokenizer is not None
    if jax.process_count() > 1:  # pair slots and vision indices are per host micro-batch
        raise UserError("preference training runs on one host (any number of its devices) "
                        "for now; multi-host pair batches are not supported yet")
    data_cfg = cfg.data
    if single_pass:
        data_cfg = dataclasses.replace(data_cfg, num_epochs=1, shuffle=False)
    ds = build_preference_dataset(
        data_cfg, tokenizer=cfg.tokenizer, num_image_tokens=model_cfg.num_image_tokens,
        image_size=model_cfg.vision.image_size, seq_len=cfg.seq_len, batch_size=rows,
        max_tiles=tiles, seed=cfg.seed, shard_index=jax.process_index(),
        shard_count=jax.process_count(), template=model_cfg.template, ref_table=ref_table)
    return iter(ds)


def precompute_reference(cfg: TrainConfig, model_cfg, mesh, graphdef, params, frozen, rest, *,
                         rows: int, tiles: int) -> epath.Path:
    """One pass over the data with the initial model (the reference): every pair's (chosen,
    rejected) log-probs, stored as JSON beside the data (`preference.ref_logps_path`); kept
    when it already exists. Single process."""
    path = ref_logps_path(cfg)
    if path.exists():
        return path
    if jax.process_count() > 1:
        raise ReferenceLogpsError(f"{path} does not exist: precompute it with a single-process "
                                  "run first (preference.reference: precomputed)")

    @jax.jit
    def fwd(params, batch):
        model = nnx.merge(graphdef, params, frozen, rest)
        return sequence_logps(model, batch, batch["ref_logps"].shape[0], packed=cfg.packed,
                              loss_chunk=cfg.loss_chunk)

    out = []
    for n, host in enumerate(make_iterator(cfg, model_cfg, rows=rows, tiles=tiles,
                                           single_pass=True)):
        meta = host.pop("pair_meta")
        batch = {k: v for k, v in host.items() if not k.startswith(contract.STATS_PREFIX)}
        with jax.set_mesh(mesh):
            c, r, _, _ = jax.device_get(fwd(params, batch))
        out += [[str(src), int(line), float(c[i]), float(r[i])]
                for i, (src, line) in enumerate(meta)]
        if n % 50 == 0:
            print(f"reference log-probs: {len(out)} pairs", file=sys.stderr, flush=True)
    fileio.write_atomic(path, json.dumps({"pairs": out}))
    print(f"reference log-probs of {len(out)} pairs stored in {path}", flush=True)
    return path



def needs_reference_pass(cfg: TrainConfig) -> bool:
    pref = cfg.preference
    return (pref is not None and pref.reference == "precomputed"
            and not ref_logps_path(cfg).exists())


def reference_pass(cfg: TrainConfig, model_cfg, s, rows: int, tiles: int):
    """Precomputes the reference log-probs with the freshly initialised setup `s` (before any
    step), then returns the training iterator (this host's `rows` and `tiles`) that reads
    them."""
    precompute_reference(cfg, model_cfg, s.mesh, s.graphdef, s.state.params, s.state.frozen,
                         s.state.rest, rows=rows, tiles=tiles)
    return make_iterator(cfg, model_cfg, rows=rows, tiles=tiles,
                         ref_table=load_ref_table(ref_logps_path(cfg)))
