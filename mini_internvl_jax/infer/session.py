"""A multi-turn chat over one loaded model, streaming each answer token by token.

Follows InternVL's `chat()`: every turn re-encodes the whole conversation with all images so
far (history questions keep their `<image>` placeholders), and an image or video added in a turn
gets its placeholder lines in front of that turn's question (`mini_internvl_jax.data.media`:
`<image>` for a lone image, `Image-k: <image>` labels once a conversation has several,
`FrameN: <image>` per video frame).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from mini_internvl_jax.data.media import media_prefix
from mini_internvl_jax.data.templates import IMAGE_PLACEHOLDER
from mini_internvl_jax.data.video import DEFAULT_NUM_FRAMES, VideoRef
from mini_internvl_jax.infer.generate import GenerationConfig
from mini_internvl_jax.infer.runtime import Runtime, TextStream
from mini_internvl_jax.infer.sampling import SamplingConfig


@dataclass
class Reply:
    text: str
    token_ids: list[int]  # generated ids, the stop token included when one was produced
    stopped: bool  # ended on a stop token (not on max_new_tokens)


@dataclass
class ChatSession:
    runtime: Runtime
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    max_new_tokens: int = 1024
    seed: int = 0
    images: list = field(default_factory=list)
    history: list[tuple[str, str]] = field(default_factory=list)
    _pending: int = 0  # images and videos added since the last question

    def add_image(self, image) -> None:
        self.images.append(image)
        self._pending += 1

    def add_video(self, video, num_frames: int = DEFAULT_NUM_FRAMES,
                  bound: tuple[float, float] | None = None) -> None:
        """A video for the next question, as `num_frames` frames (segment middles)."""
        self.images.append(VideoRef(video, num_frames, bound))
        self._pending += 1

    def reset(self) -> None:
        self.images, self.history, self._pending = [], [], 0

    def _with_placeholders(self, question: str) -> str:
        if not self._pending or IMAGE_PLACEHOLDER in question:
            return question
        earlier = self.images[:len(self.images) - self._pending]
        first = 1 + sum(not isinstance(x, VideoRef) for x in earlier)
        return media_prefix(self.images[len(earlier):], first) + question

    def ask(self, question: str, write: Callable[[str], None] | None = None) -> Reply:
        """Answers `question`, calling `write` with each new piece of text as it decodes."""
        question = self._with_placeholders(question)
        rt = self.runtime
        try:
            prompt, stop_ids = rt.prompt(self.images, question, self.history)
        except ValueError:  # e.g. an unreadable image: drop this turn's new images
            del self.images[len(self.images) - self._pending:]
            self._pending = 0
            raise
        gen = GenerationConfig(self.max_new_tokens, self.sampling, stop_token_ids=stop_ids,
                               pad_token_id=rt.tokenizer.pad_id,
                               vocab_size=rt.tokenizer.vocab_size)
        stream = TextStream(rt.tokenizer, stop_ids)
        ids: list[int] = []
        for step in rt.generator.stream([prompt], gen, seed=self.seed + len(self.history)):
            token = int(step[0])
            ids.append(token)
            piece = stream.push(token)
            if piece and write is not None:
                write(piece)
            if token in stop_ids:
                break
        tail = stream.flush()
        if tail and write is not None:
            write(tail)
        text = rt.decode(ids, stop_ids)
        self.history.append((question, text))
        self._pending = 0
        return Reply(text, ids, bool(ids) and ids[-1] in stop_ids)
