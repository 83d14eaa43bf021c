"""Run metrics: MFU against a per-chip peak table, a JSONL log, TensorBoard through
tensorboardX (scalars every logging step; at the start of a run a few training samples as tile
images with their decoded text, which is what one looks at first when a run goes wrong) and,
optionally, Weights & Biases (the same scalars, plus the run config)."""

from __future__ import annotations

import json
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
from etils import epath

from mini_internvl_jax.batch import IGNORE_INDEX
from mini_internvl_jax.data.tiling import IMAGENET_MEAN, IMAGENET_STD
from mini_internvl_jax.fileio import is_remote, upload_file, write_atomic
from mini_internvl_jax.train.config import WandbConfig

# Dense bf16 TFLOP/s per chip, matched against jax's device_kind (lower case, first hit wins).
PEAK_TFLOPS: tuple[tuple[str, float], ...] = (
    ("tpu v6", 918.0), ("tpu v5 lite", 197.0), ("tpu v5e", 197.0), ("tpu v5p", 459.0),
    ("tpu v5", 459.0), ("tpu v4", 275.0),
    ("gb200", 2250.0), ("b200", 2250.0), ("h200", 989.4), ("h100 pcie", 756.0),
    ("h100", 989.4), ("a100", 312.0), ("l40s", 362.0), ("l4", 121.0),
)
METRICS_FILE = "metrics.jsonl"
SAMPLE_TEXT_CHARS = 2000  # per sample: enough to read a prompt, short enough for the text tab


def peak_tflops(device_kind: str) -> float | None:
    kind = device_kind.lower()
    for key, value in PEAK_TFLOPS:
        if key in kind:
            return value
    return None


def mfu(flops_per_step: float, step_seconds: float, num_chips: int,
        peak_per_chip_tflops: float | None) -> float | None:
    if not peak_per_chip_tflops or step_seconds <= 0:
        return None
    return flops_per_step / step_seconds / (num_chips * peak_per_chip_tflops * 1e12)


# ----------------------------------------------------------------------------------------------
# training samples as TensorBoard sees them

def tiles_to_images(pixel_values: np.ndarray) -> np.ndarray:
    """Normalised tiles [N, 3, H, W] -> displayable float images in [0, 1] (undoes ImageNet
    mean/std normalisation)."""
    mean = np.asarray(IMAGENET_MEAN, np.float32).reshape(3, 1, 1)
    std = np.asarray(IMAGENET_STD, np.float32).reshape(3, 1, 1)
    return np.clip(np.asarray(pixel_values, np.float32) * std + mean, 0.0, 1.0)


def _collapse_image_tokens(ids: list[int], image_token_id: int) -> list[int | str]:
    """Runs of <IMG_CONTEXT> ids become one '<IMG_CONTEXT>xN' marker (a tile is hundreds)."""
    out: list[int | str] = []
    run = 0
    for t in ids + [None]:
        if t == image_token_id:
            run += 1
            continue
        if run:
            out.append(f"<IMG_CONTEXT>x{run}")
            run = 0
        if t is not None:
            out.append(t)
    return out


def _decode_collapsed(ids: list[int], image_token_id: int,
                      decode: Callable[[list[int]], str]) -> str:
    parts: list[str] = []
    pending: list[int] = []
    for item in _collapse_image_tokens(ids, image_token_id) + ["<end>"]:
        if isinstance(item, str):
            if pending:
                parts.append(decode(pending))
                pending = []
            if item != "<end>":
                parts.append(item)
        else:
            pending.append(item)
    return "".join(parts)


def describe_samples(batch: dict[str, np.ndarray], *, decode: Callable[[list[int]], str],
                     image_token_id: int, num_image_tokens: int, max_samples: int = 4
                     ) -> tuple[list[str], np.ndarray]:
    """The first `max_samples` packed samples of a host micro-batch ([B, S] / [T, ...] arrays):
    a markdown text per sample (its input and its supervised targets, decoded) and the sample's
    tiles as images [N, 3, H, W] in [0, 1]. Tiles are matched to samples by order, as the model
    splices them: each tile fills `num_image_tokens` <IMG_CONTEXT> positions."""
    texts: list[str] = []
    tile_ids: list[int] = []
    next_tile = 0
    for r in range(batch["input_ids"].shape[0]):
        ids, labels, seg = (np.asarray(batch[k][r]) for k in ("input_ids", "labels",
                                                               "segment_ids"))
        for s in dict.fromkeys(int(x) for x in seg if x != 0):
            where = seg == s
            sample_ids = [int(x) for x in ids[where]]
            n_tiles = sample_ids.count(image_token_id) // num_image_tokens
            first = next_tile
            next_tile += n_tiles
            if len(texts) >= max_samples:
                continue
            tile_ids.extend(range(first, first + n_tiles))
            targets = [int(x) for x in labels[where] if x != IGNORE_INDEX]
            text = _decode_collapsed(sample_ids, image_token_id, decode)[:SAMPLE_TEXT_CHARS]
            target = decode(targets)[:SAMPLE_TEXT_CHARS]
            where_tiles = f"tiles {first}-{first + n_tiles - 1}" if n_tiles else "no tiles"
            texts.append(f"**sample {len(texts)}** (row {r}, segment {s}, {where_tiles}, "
                         f"{len(sample_ids)} tokens, {len(targets)} supervised)\n\n"
                         + _code_block(text) + "\n\nsupervised targets:\n\n"
                         + _code_block(target))
    flags = np.asarray(batch["image_flags"])
    keep = [t for t in tile_ids if t < flags.shape[0] and flags[t]]
    pixels = np.asarray(batch["pixel_values"])
    images = tiles_to_images(pixels[keep]) if keep else np.zeros((0, *pixels.shape[1:]),
                                                                 np.float32)
    return texts, images


def _code_block(text: str) -> str:
    """Markdown preformatted text (TensorBoard renders text summaries as markdown)."""
    return "\n".join("    " + line for line in (text or "(empty)").splitlines())


def markdown_table(header: list[str], rows: list[list[Any]]) -> str:
    """A markdown table for TensorBoard's text tab; `|` and newlines inside cells are escaped."""
    def cell(v: Any) -> str:
        return str(v).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(map(cell, header)) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(map(cell, r)) + " |" for r in rows]
    return "\n".join(lines)


def open_tensorboard(log_dir: str | Path, purge_step: int | None = None) -> Any:
    """A tensorboardX SummaryWriter. Imported here: tensorboardX imports torch whenever torch is
    installed (seconds at start-up), which a run without TensorBoard should not pay."""
    from tensorboardX import SummaryWriter

    return SummaryWriter(logdir=str(log_dir), flush_secs=10, purge_step=purge_step)


def drop_rows_after(path: Path, step: int) -> int:
    """Removes rows logged after `step` (by a run that was killed and is resumed from `step`,
    so those steps run again); returns how many. Rewritten atomically."""
    if not path.exists():
        return 0
    lines = path.read_text().splitlines(keepends=True)
    keep = []
    for line in lines:
        try:
            row_step = json.loads(line).get("step")
        except (json.JSONDecodeError, AttributeError):  # a line cut short by a kill
            continue
        if isinstance(row_step, int) and row_step > step:
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    if len(keep) != len(lines):
        write_atomic(path, "".join(keep))
    return len(lines) - len(keep)


def open_wandb(cfg: WandbConfig, log_dir: str | Path | None, run_config: dict) -> Any:
    """A wandb run that records `run_config`; its files go under `log_dir` (wandb's default
    folder without one). Imported here: wandb is an optional dependency."""
    try:
        import wandb
    except ImportError:
        raise RuntimeError("log.wandb is set but the wandb package is not installed "
                           "(pip install wandb)") from None
    return wandb.init(project=cfg.project, name=cfg.name, entity=cfg.entity, mode=cfg.mode,
                      dir=None if log_dir is None else str(log_dir), config=run_config)


def _scalars(values: dict) -> dict:
    return {k: v for k, v in values.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)}


class MetricsLog:
    """metrics.jsonl (one object per logged step) and, optionally, TensorBoard events and a
    Weights & Biases run (`wandb`, recording `run_config`).

    `start_step`: the step the run resumes from; rows after it are dropped from metrics.jsonl
    and TensorBoard hides the earlier run's events after it (tensorboardX's `purge_step`), so
    re-done steps are never recorded twice.

    A `log_dir` on an object store (`gs://...`), where files cannot be appended to, is mirrored:
    everything is written to a local folder whose files are uploaded after each write (an
    existing metrics.jsonl is fetched first, so a resumed run appends to it), and the whole
    folder, wandb's offline files included, once more on `close`.
    """

    def __init__(self, log_dir: str | Path | None, *, tensorboard: bool, start_step: int = 0,
                 wandb: WandbConfig | None = None, run_config: dict | None = None):
        self.jsonl = None
        self.tb = None
        self.wandb = None
        self.remote: epath.Path | None = None
        local = None
        if log_dir is not None:
            if is_remote(log_dir):
                self.remote = epath.Path(log_dir)
                local = Path(tempfile.mkdtemp(prefix="mivl-log-"))
                if (self.remote / METRICS_FILE).exists():
                    (local / METRICS_FILE).write_bytes((self.remote / METRICS_FILE).read_bytes())
            else:
                local = Path(log_dir)
                local.mkdir(parents=True, exist_ok=True)
            drop_rows_after(local / METRICS_FILE, start_step)
            self.jsonl = (local / METRICS_FILE).open("a")
            if tensorboard:
                self.tb = open_tensorboard(local,
                                           purge_step=start_step + 1 if start_step else None)
        self.local = local
        if wandb is not None:
            self.wandb = open_wandb(wandb, local, run_config or {})

    def _sync(self, everything: bool = False) -> None:
        """Uploads the local mirror of a remote log_dir (top-level files, or all)."""
        if self.remote is None or self.local is None:
            return
        for f in sorted(self.local.rglob("*") if everything else self.local.iterdir()):
            if f.is_file():
                dest = self.remote / f.relative_to(self.local).as_posix()
                dest.parent.mkdir(parents=True, exist_ok=True)
                upload_file(f, dest)

    def write(self, step: int, values: dict) -> None:
        if self.jsonl is not None:
            self.jsonl.write(json.dumps({"step": step, **values}) + "\n")
            self.jsonl.flush()
        if self.tb is not None:
            for k, v in _scalars(values).items():
                self.tb.add_scalar(k, v, step)
        if self.wandb is not None:
            self.wandb.log(_scalars(values), step=step)
        if self.remote is not None:
            if self.tb is not None:
                self.tb.flush()
            self._sync()

    def samples(self, step: int, texts: list[str], images: np.ndarray) -> None:
        """Training samples: their tiles (one image grid) and decoded text (one text entry)."""
        if self.tb is None:
            return
        if len(images):
            self.tb.add_images("samples/tiles", images, step, dataformats="NCHW")
        self.tb.add_text("samples/text", "\n\n---\n\n".join(texts), step)
        self.tb.flush()
        self._sync()

    def close(self) -> None:
        if self.jsonl is not None:
            self.jsonl.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()
        if self.remote is not None and self.local is not None:
            self._sync(everything=True)
            shutil.rmtree(self.local, ignore_errors=True)
