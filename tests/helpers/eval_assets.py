"""A tiny converted checkpoint (random tiny-qwen2 + the demo tokenizer) and small images for
evaluation CLI tests: mechanics, not content."""

from __future__ import annotations

import dataclasses
import io
import shutil
from pathlib import Path

import numpy as np
from flax import nnx
from PIL import Image

from mini_internvl_jax.config import load_model_config
from mini_internvl_jax.convert.orbax_io import save_params, write_model_config
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.tools.demo import write_demo


def random_tiny_params(seed: int = 5, std: float = 0.1, preset: str = "tiny-qwen2") -> tuple:
    """(config, flat params) of a tiny preset with random weights (norm scales near 1), made
    from the parameter shapes alone: building the model eagerly costs a minute on CPU."""
    cfg = load_model_config(preset)
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: InternVLModel(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(seed)
    flat = {}
    for path, v in nnx.to_flat_state(nnx.state(abstract)):
        x = std * rng.randn(*v.shape)
        if "norm" in "/".join(map(str, path)) and str(path[-1]) == "weight":
            x += 1.0
        flat[tuple(path)] = x.astype(v.dtype)
    return cfg, flat


def write_checkpoint(root: Path, family: str = "qwen2") -> Path:
    """root/ckpt (root/ckpt-FAMILY for other families): params, model config and the demo
    tokenizer files of a random tiny model."""
    if not (root / "demo").exists():
        write_demo(root / "demo", num_stage1=2, num_stage2=4)
    cfg, flat = random_tiny_params(preset=f"tiny-{family}")
    rs = cfg.llm.rope_scaling
    if rs is not None and rs.type == "longrope":  # the lists a Phi-3 checkpoint carries
        half = cfg.llm.head_size // 2
        rs = dataclasses.replace(rs, short_factor=tuple(1.0 + 0.05 * i for i in range(half)),
                                 long_factor=tuple(2.0 + 0.5 * i for i in range(half)))
        cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, rope_scaling=rs))
    ckpt = root / ("ckpt" if family == "qwen2" else f"ckpt-{family}")
    ckpt.mkdir()
    save_params(ckpt / "params", flat)
    write_model_config(ckpt, cfg)
    for f in (root / "demo" / "tokenizers" / family).iterdir():
        shutil.copy(f, ckpt / f.name)
    return ckpt


def png_bytes(seed: int, size=(40, 30)) -> bytes:
    rng = np.random.RandomState(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.randint(0, 255, size[::-1] + (3,)).astype(np.uint8)).save(buf, "PNG")
    return buf.getvalue()
