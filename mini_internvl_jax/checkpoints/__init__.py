"""The folders a model or a run lives in, and the one resolver over all of them.

`run` (a training run's layout: item names, `RunMeta`, `read_run`, `restore_model`),
`checkpointer` (the one writer of run folders), `resolve` (`open_source`, `load_pretrained`: a
run, a converted folder or a Hugging Face folder), `export` (a run -> a converted folder).
The converted-folder layout itself (`convert/orbax_io.py`) stays with the converter, which
writes and reads it; this layer sits above `convert/` and below `train/` and `infer/`.
"""

from mini_internvl_jax.checkpoints.resolve import (
    Source,
    load_pretrained,
    load_pretrained_with_info,
    open_source,
)

__all__ = ["Source", "load_pretrained", "load_pretrained_with_info", "open_source"]
