"""Where a run starts: fresh, or the newest intact step of its checkpoint folder.

Resuming picks the newest step folder that restores (a damaged newest one is moved aside and
named), and refuses a changed learning rate, batch size or dataset unless the caller allows it
(`Guarded`: the settings that decide the optimizer trajectory and the data stream).
"""

from __future__ import annotations

import dataclasses
import hashlib
import sys
from dataclasses import dataclass
from typing import Any

import jax
from etils import epath

from mini_internvl_jax.checkpoints import checkpointer
from mini_internvl_jax.checkpoints.checkpointer import Checkpointer
from mini_internvl_jax.checkpoints.run import META, PARAMS, TRAIN, CheckpointError, RunMeta
from mini_internvl_jax.config import ModelConfig
from mini_internvl_jax.train.config import TrainConfig
from mini_internvl_jax.train.state import TrainState, abstract_like, split_params


def data_fingerprint(cfg: TrainConfig) -> str | None:
    """sha256 of the data meta file, so a dataset edited in place counts as changed."""
    if cfg.data is None:
        return None
    try:
        return hashlib.sha256(epath.Path(cfg.data.meta_path).read_bytes()).hexdigest()[:16]
    except OSError:
        return None


def run_meta(cfg: TrainConfig, model_cfg: ModelConfig, step: int) -> RunMeta:
    """The record a step folder of this run stores (the data fingerprint included)."""
    return checkpointer.run_meta(cfg, model_cfg, step, data_fingerprint=data_fingerprint(cfg))


def _at(tree: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        tree = tree.get(part) if isinstance(tree, dict) else None
    return tree


@dataclass(frozen=True)
class Guarded:
    """What a resumed run may not change silently: the optimizer trajectory and the data
    stream. Each field's metadata names its config key; a fingerprint of None is unknown."""

    lr: float | None = dataclasses.field(metadata={"key": "optim.lr"})
    batch_size: int | None = dataclasses.field(metadata={"key": "batch_size"})
    meta_path: str | None = dataclasses.field(metadata={"key": "data.meta_path"})
    data_fingerprint: str | None = dataclasses.field(metadata={"key": "data_fingerprint"})

    @classmethod
    def of(cls, meta: RunMeta) -> Guarded:
        values = {f.name: _at(meta.train_config, f.metadata["key"])
                  for f in dataclasses.fields(cls) if f.name != "data_fingerprint"}
        return cls(**values, data_fingerprint=meta.data_fingerprint)

    def changes_to(self, new: Guarded) -> list[str]:
        """`key: old -> new` for each setting that differs."""
        out = []
        for f in dataclasses.fields(self):
            old, now = getattr(self, f.name), getattr(new, f.name)
            unknown = f.name == "data_fingerprint" and None in (old, now)
            if old != now and not unknown:
                out.append(f"{f.metadata['key']}: {old!r} -> {now!r}")
        return out


def config_changes(cfg: TrainConfig, model_cfg: ModelConfig, meta: RunMeta) -> list[str]:
    """`key: old -> new` for each guarded setting that differs from the checkpoint's run."""
    return Guarded.of(meta).changes_to(Guarded.of(run_meta(cfg, model_cfg, meta.step)))


def _say(text: str) -> None:
    if jax.process_index() == 0:
        print(text, file=sys.stderr, flush=True)


def _delete(tree) -> None:
    for x in jax.tree.leaves(tree):
        if isinstance(x, jax.Array):
            x.delete()


def initial_state(cfg: TrainConfig, model_cfg: ModelConfig, fresh: TrainState,
                  ckpt: Checkpointer | None, iterator, *, allow_config_change: bool = False
                  ) -> tuple[TrainState, int, list[str]]:
    """(state, steps already taken, guarded settings changed by this resume).

    `fresh` (the initialised state) is returned as it is when there is nothing to resume;
    otherwise its buffers are freed and the newest intact step is restored into its shardings
    (and the data iterator to its position).
    """
    latest = ckpt.latest_step() if ckpt is not None else None
    if ckpt is None or latest is None:
        return fresh, 0, []
    if not cfg.checkpoint.resume:
        raise CheckpointError(f"checkpoint.dir {cfg.checkpoint.dir} already holds step {latest} "
                              "and checkpoint.resume is false; use a new directory (or resume: "
                              "true)")
    params, train = fresh.all_params(), fresh.train_item()
    targets = {k: abstract_like(t, jax.tree.map(lambda x: x.sharding, t))
               for k, t in ((PARAMS, params), (TRAIN, train))}
    _delete((params, train))
    start, out, note = ckpt.restore_newest_intact(params=targets[PARAMS], train=targets[TRAIN],
                                                  iterator=iterator)
    if note:
        _say(f"warning: {note}")
    changes = config_changes(cfg, model_cfg, out[META])
    if changes and not allow_config_change:
        raise CheckpointError(
            f"{cfg.checkpoint.dir} step {start} was trained with other settings ("
            + "; ".join(changes) + "); resuming would silently change the run. Restore "
            "them, use a new checkpoint.dir, or pass --allow-config-change")
    if changes:
        _say("resuming with changed settings (--allow-config-change): " + "; ".join(changes))
    trainable, frozen = split_params(out[PARAMS], cfg.frozen_components)[:2]
    state = TrainState(params=trainable, frozen=frozen, rest=fresh.rest, **out[TRAIN])
    return state, start, changes
