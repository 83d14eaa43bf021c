"""One resolver for every folder a model can come from: a training run's checkpoint folder, a
converted folder (convert_weights.py, or an exported run) and a Hugging Face InternVL folder.

`open_source(path)` reads only configs and headers and says what the folder is, its model
config and how its weights are stored; `Source.load(compute, mesh=...)` builds the model. The
trainer's `init_from`, chat, evaluation and export all go through it, so a folder that works for
one works for all.

A folder on an object store (`gs://...`) is copied to a local temporary folder first
(`fileio.local_copy`; of a training run only the chosen step, the latest whose save finished)
and read from there, so every reader below works on local files.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, cast

from etils import epath
from jax.sharding import Mesh

from mini_internvl_jax import fileio
from mini_internvl_jax.checkpoints.run import (
    RunFolder,
    finished_steps,
    is_training_checkpoint,
    is_unsaved_run,
    read_run,
    restore_model,
)
from mini_internvl_jax.config import ComputeConfig, Dtype, ModelConfig
from mini_internvl_jax.convert.errors import CheckpointReadError
from mini_internvl_jax.convert.importer import HFSource, open_hf, resolve_dtype
from mini_internvl_jax.convert.load import load_converted, load_hf, stored_compute
from mini_internvl_jax.convert.orbax_io import (
    MODEL_CONFIG,
    PARAMS_DIR,
    is_converted_folder,
    read_converted,
)
from mini_internvl_jax.data.tokenizer import find_tokenizer
from mini_internvl_jax.models import InternVLModel

SourceKind = Literal["training_run", "converted", "hf"]


@dataclass(frozen=True)
class Source:
    """A folder holding a model, opened (configs and headers read, no weights yet)."""

    kind: SourceKind
    path: Path                      # where it is read from (a local copy of a store's folder)
    model_config: ModelConfig
    # How the weights are stored (dtype, layer stacking); what `load()` runs without a compute.
    compute: ComputeConfig
    layout: str | None              # HF layout of the original checkpoint, when known
    # A folder holding tokenizer files, if one was found (a run's: its `tokenizer`, which may be
    # a store's folder).
    tokenizer_dir: Path | str | None
    strict: bool = True             # hf: unexpected tensors are an error
    _hf: HFSource | None = field(default=None, repr=False, compare=False)
    _run: RunFolder | None = field(default=None, repr=False, compare=False)

    @property
    def template(self) -> str:
        """Conversation template name (data/templates)."""
        return self.model_config.template

    @property
    def image_token_id(self) -> int:
        return self.model_config.image_token_id

    def load(self, compute: ComputeConfig | None = None, *, mesh: Mesh | None = None
             ) -> InternVLModel:
        """The model under `compute` (None: `self.compute`), its parameters placed on `mesh`'s
        shardings (or the first device). A training run's LoRA adapters come merged."""
        compute = self.compute if compute is None else compute
        if self.kind == "training_run":
            assert self._run is not None
            return restore_model(self._run, compute, mesh=mesh)
        if self.kind == "converted":
            return load_converted(self.path, compute, mesh=mesh)
        assert self._hf is not None
        return load_hf(self._hf, compute, mesh=mesh, strict=self.strict)


def _tokenizer_dir(folder: Path | None) -> Path | None:
    return folder if folder is not None and find_tokenizer(folder) is not None else None


def open_source(path: str | Path, *, step: int | None = None,
                overrides: list[str] | tuple[str, ...] = (), strict: bool = True) -> Source:
    """What `path` is and holds. `step` picks a training run's step (default: the latest);
    `overrides` (`key=value`) and `strict` apply to Hugging Face folders, as in
    convert_weights.py."""
    if fileio.is_remote(path):
        return open_source(_copy_from_store(str(path), step), step=step, overrides=overrides,
                           strict=strict)
    p = Path(path)
    if not p.exists():
        raise CheckpointReadError(f"{path} does not exist")
    if is_training_checkpoint(str(path)):
        run = read_run(str(path), step)
        tok = run.tokenizer if run.tokenizer and epath.Path(run.tokenizer).is_dir() else None
        stored = run.compute.replace(remat="none", remat_vision=None, check_image_tokens=True)
        return Source("training_run", p, run.model_config, stored, None, tok, _run=run)
    if is_converted_folder(p):
        cfg, conversion = read_converted(p)
        return Source("converted", p, cfg, stored_compute(p), conversion.get("layout"),
                      _tokenizer_dir(p))
    if (p / "config.json").is_file():
        src = open_hf(p, overrides)
        dtype = cast(Dtype, resolve_dtype(None, src.reader))
        return Source("hf", p, src.info.config, ComputeConfig(dtype=dtype, param_dtype=dtype),
                      src.info.layout, _tokenizer_dir(p), strict, _hf=src)
    if is_unsaved_run(str(path)):
        raise CheckpointReadError(f"{path} is a training run folder with no finished "
                                  "checkpoint step yet (no step folder with its meta); wait for "
                                  "the first save (checkpoint.every) or use an earlier run")
    raise CheckpointReadError(_NOT_A_MODEL_FOLDER.format(path=path))


_NOT_A_MODEL_FOLDER = (
    "{path} is neither a training run's checkpoint folder (step folders), a converted folder "
    f"({MODEL_CONFIG} + {PARAMS_DIR}/) nor a Hugging Face folder (config.json + weights)")


def _copy_from_store(uri: str, step: int | None) -> Path:
    """The local copy of a store's model folder: of a run, only the step to read."""
    root = epath.Path(uri)
    if not root.is_dir():
        raise CheckpointReadError(f"{uri} does not exist")
    try:
        fileio.check_complete(uri)
        if is_training_checkpoint(uri):
            finished = finished_steps(uri)
            if step is None and not finished:
                raise CheckpointReadError(f"{uri} holds no finished training checkpoint (no "
                                          "step folder has Orbax's commit file)")
            if step is not None and step not in finished:
                raise CheckpointReadError(f"{uri} has no finished step {step} (finished: "
                                          f"{finished or 'none'})")
            return fileio.local_copy(uri, only=(str(step if step is not None else finished[-1]),))
        if not ((root / MODEL_CONFIG).exists() or (root / "config.json").exists()):
            raise CheckpointReadError(_NOT_A_MODEL_FOLDER.format(path=uri))
        return fileio.local_copy(uri)
    except fileio.IncompleteFolderError as e:
        raise CheckpointReadError(str(e)) from None


def load_pretrained_with_info(path: str | Path, compute: ComputeConfig | None = None, *,
                              mesh: Mesh | None = None, strict: bool = True,
                              overrides: list[str] | tuple[str, ...] = ()
                              ) -> tuple[InternVLModel, Source]:
    """(model, Source) from any folder `open_source` knows; `compute` None keeps how the
    weights are stored (their dtype, stacked or per-layer)."""
    source = open_source(path, overrides=overrides, strict=strict)
    return source.load(compute, mesh=mesh), source


def load_pretrained(path: str | Path, compute: ComputeConfig | None = None, *,
                    mesh: Mesh | None = None, **kwargs) -> InternVLModel:
    """InternVLModel from a training run, converted or Hugging Face folder; see
    load_pretrained_with_info."""
    return load_pretrained_with_info(path, compute, mesh=mesh, **kwargs)[0]


__all__ = ["Source", "SourceKind", "load_pretrained", "load_pretrained_with_info",
           "open_source"]
