"""What the chat and evaluation CLIs share: checkpoint + tokenizer loading, mesh flags, turning
chat requests into prompts and generated ids back into text."""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass

import jax

from mini_internvl_jax.config import DTYPES
from mini_internvl_jax.convert.resolve import open_source
from mini_internvl_jax.data.processing import prepare_chat_inputs
from mini_internvl_jax.data.tokenizer import Tokenizer, load_tokenizer
from mini_internvl_jax.infer.generate import Generator, Prompt
from mini_internvl_jax.sharding import MESH_AXES, make_mesh


def parse_mesh(spec: str | None):
    """`tensor=2` or `data=2,tensor=4` -> a mesh over the first data*fsdp*tensor devices."""
    if not spec:
        return None
    sizes = {"data": 1, "fsdp": 1, "tensor": 1}
    for part in spec.split(","):
        name, sep, value = part.partition("=")
        name = name.strip()
        if not sep or name not in MESH_AXES or not value.strip().isdigit() or int(value) < 1:
            raise ValueError(f"--mesh {spec!r}: expected comma-separated AXIS=N with AXIS in "
                             f"{MESH_AXES} and N >= 1, e.g. 'tensor=2'")
        sizes[name] = int(value)
    n = math.prod(sizes.values())
    devices = jax.devices()
    if n > len(devices):
        raise ValueError(f"--mesh {spec!r} needs {n} devices, {len(devices)} are available")
    return make_mesh(sizes["data"], sizes["fsdp"], sizes["tensor"], devices=devices[:n])


def add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--checkpoint", required=True, metavar="DIR",
                   help="converted folder (mivl-convert), Hugging Face InternVL folder or a "
                        "training run's checkpoint.dir")
    p.add_argument("--tokenizer", metavar="DIR",
                   help="tokenizer folder (default: the checkpoint folder)")
    p.add_argument("--dtype", choices=DTYPES,
                   help="parameter and compute dtype (default: as stored)")
    p.add_argument("--mesh", metavar="AXIS=N,...",
                   help="shard parameters over devices, e.g. 'tensor=2' (axes data, fsdp, "
                        "tensor) for models that do not fit one device")
    p.add_argument("--max-num", type=int, default=None, metavar="N",
                   help="tile budget before the thumbnail (dynamic tiling): one image gets up "
                        "to N tiles, k images max(1, N // k) each, as InternVL")
    p.add_argument("--max-new-tokens", type=positive_int, default=None,
                   help="default: 1024 for chat, the task's own for evaluation")
    p.add_argument("--system", default=None, help="system message (default: InternVL's)")


def positive_int(text: str) -> int:
    """argparse type: 0 would otherwise read as "unset" and silently become the default."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


@dataclass
class Runtime:
    """A loaded model ready to answer chat requests."""

    generator: Generator
    tokenizer: Tokenizer
    template: str
    max_num: int
    system_message: str | None = None

    def prompt(self, images: Sequence, question: str,
               history: Sequence[tuple[str, str]] = ()) -> tuple[Prompt, tuple[int, ...]]:
        """(Prompt, stop ids) for InternVL's chat format, images tiled as in training."""
        cfg = self.generator.cfg
        inputs = prepare_chat_inputs(
            list(images), question, history, tokenizer=self.tokenizer, template=self.template,
            image_size=cfg.vision.image_size, num_image_tokens=cfg.num_image_tokens,
            max_num=self.max_num, system_message=self.system_message)
        limit = cfg.llm.max_position_embeddings
        if len(inputs.input_ids) >= limit:  # positions past it were never trained
            tiles = len(inputs.pixel_values)
            raise ValueError(
                f"the prompt is {len(inputs.input_ids)} tokens ({tiles} image tiles x "
                f"{cfg.num_image_tokens} tokens), at least the model's {limit} positions "
                "(llm.max_position_embeddings); use fewer video frames or images, or a smaller "
                "--max-num")
        px = inputs.pixel_values if len(inputs.pixel_values) else None
        return Prompt(inputs.input_ids, px), inputs.stop_token_ids

    def decode(self, ids: Sequence[int], stop_ids: Sequence[int]) -> str:
        """Answer text: stop tokens dropped, cut at the template separator, stripped."""
        text = self.tokenizer.decode([i for i in ids if i not in stop_ids])
        sep = self.tokenizer.decode([stop_ids[0]]) if stop_ids else ""
        if sep.strip():
            text = text.split(sep.strip())[0]
        return text.strip()


def load_runtime(args: argparse.Namespace, default_max_num: int) -> Runtime:
    """Any folder convert/resolve.py knows (training run, converted, Hugging Face), run in the
    dtype it stores unless --dtype says otherwise."""
    mesh = parse_mesh(args.mesh)
    source = open_source(args.checkpoint)
    compute = source.compute
    if args.dtype is not None:
        compute = compute.replace(dtype=args.dtype, param_dtype=args.dtype)
    model = source.load(compute, mesh=mesh)
    tok_dir = args.tokenizer or source.tokenizer_dir
    if tok_dir is None:
        raise FileNotFoundError(f"{args.checkpoint} holds no tokenizer (tokenizer.model, "
                                "tokenizer.json, or vocab.json + merges.txt); pass "
                                "--tokenizer DIR")
    tokenizer = load_tokenizer(tok_dir)
    max_num = default_max_num if args.max_num is None else args.max_num
    if max_num < 1:
        raise ValueError(f"--max-num must be >= 1, got {max_num}")
    return Runtime(Generator(model, mesh=mesh), tokenizer, source.template, max_num,
                   args.system)


class TextStream:
    """Incremental detokenization with prefix/read offsets (as vLLM's): each step decodes only
    the tokens since the last printed text plus the ones printed last, as context for
    SentencePiece's leading-space rule, so a step costs the same at token 10 and 1000. Text is
    held back while it ends inside a multi-byte character (U+FFFD); the pieces add up to the
    decode of all tokens."""

    def __init__(self, tokenizer: Tokenizer, stop_ids: Sequence[int]):
        self.tokenizer = tokenizer
        self.stop_ids = set(stop_ids)
        self.ids: list[int] = []
        self.prefix = 0  # start of the context window
        self.read = 0  # tokens already shown

    def _delta(self, final: bool) -> str:
        shown = self.tokenizer.decode(self.ids[self.prefix:self.read])
        text = self.tokenizer.decode(self.ids[self.prefix:])
        if not final and (len(text) <= len(shown) or text.endswith("\ufffd")):
            return ""
        self.prefix, self.read = self.read, len(self.ids)
        return text[len(shown):]

    def push(self, token: int) -> str:
        if token in self.stop_ids:
            return ""
        self.ids.append(int(token))
        return self._delta(final=False)

    def flush(self) -> str:
        """Whatever is still held back once generation has ended."""
        return self._delta(final=True)
