"""A loaded model answering chat requests: requests into prompts, generated ids back into text.
(The commands' model-loading arguments live in cli/_shell.py.)"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from mini_internvl_jax.data.processing import prepare_chat_inputs
from mini_internvl_jax.data.tokenizer import Tokenizer
from mini_internvl_jax.errors import UserError
from mini_internvl_jax.infer.generate import Generator, Prompt


class PromptTooLongError(UserError, ValueError):
    """A prompt (text and image tokens) longer than the model's positions."""


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
            raise PromptTooLongError(
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
