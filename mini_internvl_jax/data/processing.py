"""One record -> one training sample (ids, shifted labels, weights, uint8 tiles), and the
same tiling/template path for inference prompts.

Cheap checks run first (structure, roles, placeholder count, image headers, token length,
tile budget) so a sample that will be skipped never pays for decoding and resizing.
"""

from __future__ import annotations

import io
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from etils import epath
from PIL import Image

from mini_internvl_jax.batch import IGNORE_INDEX
from mini_internvl_jax.data import tiling
from mini_internvl_jax.data.config import DataConfig
from mini_internvl_jax.data.errors import DataError, Skipped, SkipSample
from mini_internvl_jax.data.media import (
    VIDEO_PLACEHOLDER,
    expand_video_placeholder,
    image_budget,
    media_prefix,
    num_placeholders,
)
from mini_internvl_jax.data.sources import DatasetSpec, Mixture, Record
from mini_internvl_jax.data.templates import (
    GPT,
    HUMAN,
    IMAGE_PLACEHOLDER,
    ChatTemplate,
    count_placeholders,
    encode_chat,
    get_template,
    render,
    stop_token_ids,
)
from mini_internvl_jax.data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, Tokenizer
from mini_internvl_jax.data.video import (
    VideoError,
    VideoRef,
    load_video,
    read_frames,
    resize_frames,
    sample_num_frames,
    train_frame_indices,
)


@dataclass
class Sample:
    """A processed sample, ready for packing (labels already shifted, see pipeline docs)."""

    input_ids: np.ndarray  # int32 [L]
    labels: np.ndarray  # int32 [L]; labels[t] = input_ids[t+1] if that token is trained
    loss_weights: np.ndarray  # float32 [L]; 0 where labels == IGNORE_INDEX
    tiles: np.ndarray  # uint8 [n, H, W, 3], in placeholder order, thumbnails last per image
    tile_flags: np.ndarray  # int32 [n]; 0 only for InternVL's text-only dummy tile
    truncated: bool
    source: str
    line: int

    def __len__(self) -> int:
        return len(self.input_ids)


def parse_conversations(conv) -> tuple[list[tuple[str, str]], str | None]:
    """InternVL `conversations` -> [(role, text)] and an optional leading system message."""
    if not isinstance(conv, list) or not conv:
        raise SkipSample("malformed_json", "'conversations' must be a non-empty list")
    system = None
    msgs: list[tuple[str, str]] = []
    for k, turn in enumerate(conv):
        if not (isinstance(turn, dict) and isinstance(turn.get("from"), str)
                and isinstance(turn.get("value"), str)):
            raise SkipSample("malformed_json",
                             f"turn {k} must be an object with string 'from' and 'value'")
        role, value = turn["from"], turn["value"]
        if role == "system":
            if k != 0:
                raise SkipSample("bad_turn_order", f"system turn {k} is not the first turn")
            system = value
            continue
        if role not in (HUMAN, GPT):
            raise SkipSample("unknown_role", f"turn {k} has role {role!r}; expected "
                                             f"{HUMAN!r} or {GPT!r} (or a leading 'system')")
        if not value.strip():
            raise SkipSample("malformed_json", f"turn {k} ({role}) is empty")
        msgs.append((role, value))
    if msgs and msgs[0][0] == GPT:  # InternVL drops a leading assistant turn
        msgs = msgs[1:]
    if not msgs:
        raise SkipSample("malformed_json", "no human/gpt turns")
    for k, (role, _) in enumerate(msgs):
        expected = HUMAN if k % 2 == 0 else GPT
        if role != expected:
            raise SkipSample("bad_turn_order",
                             f"turn {k} is {role!r} where {expected!r} was expected "
                             "(turns must alternate human, gpt, ...)")
    return msgs, system


def place_image_placeholders(msgs: list[tuple[str, str]], num_images: int
                             ) -> list[tuple[str, str]]:
    """Without any placeholder, puts `<image>\\n` (one image) or `Image-k: <image>\\n` lines
    (several) in front of the first human turn (see `media`); any other count mismatch is an
    error."""
    n_ph = count_placeholders(msgs)
    if num_images and n_ph == 0:
        role, text = msgs[0]
        return [(role, media_prefix([None] * num_images) + text)] + msgs[1:]
    if n_ph != num_images:
        raise SkipSample("placeholder_mismatch",
                         f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) for {num_images} image(s)")
    return msgs


def place_video_placeholders(msgs: list[tuple[str, str]], num_frames: int
                             ) -> list[tuple[str, str]]:
    """Replaces the one `<video>` (put in front of the first human turn when absent, as
    InternVL does) by `Frame1: <image>\\n...` lines, one per frame."""
    if count_placeholders(msgs):
        raise SkipSample("placeholder_mismatch",
                         f"a video sample has {IMAGE_PLACEHOLDER} placeholders in its text")
    n_vid = sum(text.count(VIDEO_PLACEHOLDER) for _, text in msgs)
    if n_vid > 1:
        raise SkipSample("placeholder_mismatch", f"{n_vid} {VIDEO_PLACEHOLDER} placeholders "
                                                 "for one video")
    if n_vid == 0:
        msgs = [(msgs[0][0], f"{VIDEO_PLACEHOLDER}\n" + msgs[0][1])] + msgs[1:]
    return [(role, expand_video_placeholder(text, num_frames)
             if VIDEO_PLACEHOLDER in text else text) for role, text in msgs]


def open_image(ref) -> Image.Image:
    """Opens (header only) a path, encoded bytes, array or PIL image; bad ones raise
    `SkipSample` with missing_image / corrupt_image."""
    if isinstance(ref, Image.Image):
        return ref
    if isinstance(ref, np.ndarray):
        arr = ref[..., 0] if ref.ndim == 3 and ref.shape[-1] == 1 else ref
        try:
            return Image.fromarray(arr)
        except (TypeError, ValueError) as e:
            raise SkipSample("corrupt_image", f"array of shape {ref.shape} {ref.dtype}: {e}"
                             ) from None
    if isinstance(ref, (str, os.PathLike)):
        try:
            data = epath.Path(ref).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError, PermissionError) as e:
            raise SkipSample("missing_image", f"{ref}: {type(e).__name__}") from None
        name = str(ref)
    else:
        data, name = ref, "embedded image"
    try:
        im = Image.open(io.BytesIO(data))
    except Exception as e:  # PIL raises many types for broken files (incl. decompression bombs)
        raise SkipSample("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None
    if im.width < 1 or im.height < 1:
        raise SkipSample("corrupt_image", f"{name}: size {im.size}")
    return im


def decode_rgb(im: Image.Image, name: str = "image") -> Image.Image:
    """Pixels of an opened image as RGB, like `Image.open(...).convert('RGB')`."""
    try:
        im.load()
        return im if im.mode == "RGB" else im.convert("RGB")
    except Exception as e:  # truncated or broken image data; PIL raises many types
        raise SkipSample("corrupt_image", f"{name}: {type(e).__name__}: {e}") from None


@dataclass(frozen=True)
class TileSpec:
    image_size: int
    min_num: int
    max_num: int
    use_thumbnail: bool
    dynamic: bool

    def count(self, im: Image.Image) -> int:
        if not self.dynamic:
            return 1
        return tiling.num_tiles(*im.size, min_num=self.min_num, max_num=self.max_num,
                                image_size=self.image_size, use_thumbnail=self.use_thumbnail)

    def tiles(self, im: Image.Image) -> np.ndarray:
        if not self.dynamic:
            return tiling.resize_single(im, self.image_size)
        return tiling.tile_image(im, image_size=self.image_size, min_num=self.min_num,
                                 max_num=self.max_num, use_thumbnail=self.use_thumbnail)


def shifted_labels(input_ids: np.ndarray, trained: np.ndarray) -> np.ndarray:
    """labels[t] = input_ids[t+1] where token t+1 is trained, else IGNORE_INDEX (the last
    token's too)."""
    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int32)
    labels[:-1] = np.where(trained[1:], input_ids[1:], IGNORE_INDEX)
    return labels


def loss_weights(labels: np.ndarray, reduction: str) -> np.ndarray:
    mask = labels != IGNORE_INDEX
    n = int(mask.sum())
    w = {"token": 1.0, "sample": 1.0 / max(n, 1), "square": 1.0 / math.sqrt(max(n, 1))}[reduction]
    return np.where(mask, np.float32(w), np.float32(0)).astype(np.float32)


class SampleProcessor:
    """Callable for `MapDataset.map`: (plan index, mixture index) -> `Sample` | `Skipped`."""

    def __init__(self, cfg: DataConfig, mixture: Mixture, tokenizer: Tokenizer, *,
                 image_size: int, num_image_tokens: int, seq_len: int, max_tiles: int,
                 seed: int):
        self.cfg = cfg
        self.mixture = mixture
        self.tokenizer = tokenizer
        if cfg.template is None:
            raise DataError("data.template is unset: name a chat template (build_train_dataset "
                            "fills in the model's)")
        self.template = get_template(cfg.template)
        tokenizer.require(self.template.special_tokens + (IMG_START, IMG_END, IMG_CONTEXT),
                          f"template {cfg.template!r} with images")
        self.ctx_id = tokenizer.token_id(IMG_CONTEXT)
        self.image_size = image_size
        self.num_image_tokens = num_image_tokens
        self.seq_len = seq_len
        self.row_tiles = min(max_tiles, cfg.max_tiles_per_row or max_tiles)
        self.seed = seed

    def __call__(self, item: tuple[int, int]) -> Sample | Skipped:
        plan_index, mix_index = item
        d, i = self.mixture.locate(mix_index)
        src = self.mixture.sources[d]
        try:
            return self.process(src.read(i), src.spec, plan_index)
        except SkipSample as e:
            return Skipped(e.reason, e.detail, src.name, src.line_of(i))

    def process(self, rec: Record, spec: DatasetSpec, plan_index: int,
                reuse_tiles: tuple[np.ndarray, np.ndarray] | None = None) -> Sample:
        """`reuse_tiles`: (tiles, flags) already cut from `rec`'s images (a preference pair's
        second answer), so only the text is encoded."""
        cfg = self.cfg
        msgs, system = parse_conversations(rec.conversations)
        video_rng, n_frames = None, 0
        if rec.video is not None:
            # Frame count and picks: a stream of their own, so JPEG draws stay as they were.
            video_rng = np.random.default_rng([self.seed, plan_index, 1])
            n_frames = sample_num_frames(video_rng, cfg.min_num_frames, cfg.max_num_frames)
            msgs = place_video_placeholders(msgs, n_frames)
        else:
            msgs = place_image_placeholders(msgs, len(rec.images))
        if self.template.strip_messages:
            msgs = [(r, t.strip()) for r, t in msgs]
        if system is None:
            system = cfg.system_message

        opened = [open_image(ref) for ref in rec.images]
        mdp = spec.max_dynamic_patch or cfg.max_dynamic_patch
        spec_t = TileSpec(self.image_size, cfg.min_dynamic_patch, image_budget(mdp, len(opened)),
                          cfg.use_thumbnail, cfg.dynamic_image_size)
        counts = [spec_t.count(im) for im in opened] if video_rng is None else [1] * n_frames
        n_tiles = sum(counts) or int(cfg.text_only_dummy_tile)
        if n_tiles > self.row_tiles:
            raise SkipSample("too_many_tiles", f"{n_tiles} tiles > {self.row_tiles} per row")

        enc = encode_chat(self.tokenizer, self.template, msgs,
                          [self.num_image_tokens * c for c in counts], system_message=system)
        ids, trained = enc.input_ids, enc.trained
        n_ctx = int(np.count_nonzero(ids == self.ctx_id))
        if n_ctx != self.num_image_tokens * sum(counts):
            raise SkipSample("placeholder_mismatch",
                             f"the text itself contains {IMG_CONTEXT} tokens")
        truncated = False
        if len(ids) > self.seq_len:
            if cfg.overlong == "drop":
                raise SkipSample("too_long", f"{len(ids)} tokens > seq_len {self.seq_len}")
            if enc.image_spans and enc.image_spans[-1][1] > self.seq_len:
                raise SkipSample("too_long", f"{len(ids)} tokens > seq_len {self.seq_len} and "
                                             "cutting would split an image")
            ids, trained, truncated = ids[:self.seq_len], trained[:self.seq_len], True
        labels = shifted_labels(ids, trained)
        if not (labels != IGNORE_INDEX).any():
            raise SkipSample("no_targets", "no assistant tokens to train on"
                             + (" after truncation" if truncated else ""))

        size = self.image_size
        if reuse_tiles is not None:
            tiles, flags = reuse_tiles
        elif video_rng is not None:
            tiles = self._video_tiles(rec, spec, plan_index, n_frames, video_rng)
            flags = np.ones(len(tiles), dtype=np.int32)
        elif opened:
            names = [r if isinstance(r, str) else "embedded image" for r in rec.images]
            parts = [spec_t.tiles(decode_rgb(im, n)) for im, n in zip(opened, names, strict=True)]
            tiles = parts[0] if len(parts) == 1 else np.concatenate(parts)
            flags = np.ones(len(tiles), dtype=np.int32)
            if spec.data_augment:
                rng = np.random.default_rng([self.seed, plan_index])
                q = rng.integers(cfg.jpeg_quality_min, cfg.jpeg_quality_max + 1, len(tiles))
                tiles = tiling.jpeg_degrade(tiles, q)
        elif cfg.text_only_dummy_tile:
            tiles = np.full((1, size, size, 3), 255, dtype=np.uint8)
            flags = np.zeros(1, dtype=np.int32)
        else:
            tiles = np.zeros((0, size, size, 3), dtype=np.uint8)
            flags = np.zeros(0, dtype=np.int32)
        return Sample(input_ids=ids, labels=labels,
                      loss_weights=loss_weights(labels, cfg.loss_reduction), tiles=tiles,
                      tile_flags=flags, truncated=truncated, source=rec.source, line=rec.line)

    def _video_tiles(self, rec: Record, spec: DatasetSpec, plan_index: int, n_frames: int,
                     rng: np.random.Generator) -> np.ndarray:
        """One tile per sampled frame; InternVL's JPEG augmentation acts on the whole frame,
        before the resize."""
        cfg = self.cfg

        def choose(vlen: int, fps: float) -> list[int]:
            start = 0
            if rec.clip is not None:  # InternVL: frames [start*fps, start*fps + len*fps)
                start, vlen = int(rec.clip[0] * fps), int((rec.clip[1] - rec.clip[0]) * fps)
                if vlen < 1:
                    raise VideoError("corrupt_video", f"{rec.video}: clip {rec.clip} at {fps} "
                                                      "fps holds no frame")
            return [start + i for i in train_frame_indices(vlen, n_frames, rng,
                                                           cfg.frame_sampling)]

        try:
            frames = read_frames(rec.video, choose).images
        except VideoError as e:
            raise SkipSample(e.reason, str(e)) from None
        if spec.data_augment:
            q = np.random.default_rng([self.seed, plan_index]).integers(
                cfg.jpeg_quality_min, cfg.jpeg_quality_max + 1, len(frames))
            frames = [Image.fromarray(a) for a in tiling.jpeg_degrade(
                np.stack([np.asarray(f) for f in frames]), q)]
        return resize_frames(frames, self.image_size)


@dataclass
class PromptInputs:
    """Model inputs for one generation request (batch of one, unpadded)."""

    input_ids: np.ndarray  # int32 [L]
    pixel_values: np.ndarray  # float32 [T, 3, H, W], ImageNet-normalised
    image_flags: np.ndarray  # int32 [T], all 1
    num_tiles: list[int]  # per <image> placeholder (a video frame is one), thumbnail included
    stop_token_ids: tuple[int, ...]
    prompt: str  # rendered prompt with <image> placeholders not expanded


def prepare_chat_inputs(images: Sequence | None, question: str,
                        history: Sequence[tuple[str, str]] = (), *, tokenizer: Tokenizer,
                        template: str | ChatTemplate, image_size: int = 448,
                        num_image_tokens: int = 256, max_num: int = 12, min_num: int = 1,
                        use_thumbnail: bool = True, dynamic: bool = True,
                        system_message: str | None = None) -> PromptInputs:
    """InternVL `chat()` inputs from images (PIL, path or bytes) and videos (`VideoRef`), a
    question and history.

    `max_num` is the tile budget of one image; k images get max(1, max_num // k) each (see
    `media`), video frames one tile each. Without any `<image>` in the question or history,
    the `media` placeholder lines go in front of the question (`<image>\\n`, `Image-k:` lines,
    `FrameN:` lines); otherwise the question and history must hold one `<image>` per image and
    per video frame, in order.
    """
    tmpl = get_template(template) if isinstance(template, str) else template
    if images is None:
        images = []
    elif isinstance(images, (str, bytes, Image.Image, os.PathLike, VideoRef)):
        images = [images]
    msgs: list[tuple[str, str]] = []
    for q, a in history:
        msgs += [(HUMAN, q), (GPT, a)]
    n_ph, need = count_placeholders(msgs + [(HUMAN, question)]), num_placeholders(images)
    if images and n_ph == 0:
        question = media_prefix(images) + question
    elif n_ph != need:
        raise DataError(f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) in the question and history "
                         f"for {need} (one per image and per video frame)")
    msgs.append((HUMAN, question))
    n_still = sum(not isinstance(x, VideoRef) for x in images)
    spec = TileSpec(image_size, min_num, image_budget(max_num, n_still), use_thumbnail, dynamic)
    tiles: list[np.ndarray] = []
    try:
        for ref in images:
            if isinstance(ref, VideoRef):
                frames = load_video(ref).images
                tiles += list(resize_frames(frames, image_size)[:, None])
            else:
                tiles.append(spec.tiles(decode_rgb(open_image(ref))))
    except SkipSample as e:
        raise DataError(f"cannot read image: {e}") from None
    except VideoError as e:
        raise DataError(f"cannot read video: {e}") from None
    counts = [len(t) for t in tiles]
    enc = encode_chat(tokenizer, tmpl, msgs, [num_image_tokens * c for c in counts],
                      system_message=system_message, add_generation_prompt=True)
    if tiles:
        pixel_values = tiling.normalize_tiles(np.concatenate(tiles))
    else:
        pixel_values = np.zeros((0, 3, image_size, image_size), dtype=np.float32)
    return PromptInputs(
        input_ids=enc.input_ids, pixel_values=pixel_values,
        image_flags=np.ones(len(pixel_values), dtype=np.int32), num_tiles=counts,
        stop_token_ids=stop_token_ids(tokenizer, tmpl),
        prompt=render(tmpl, msgs, system_message=system_message, add_generation_prompt=True))
