"""Where images and video frames go in a prompt, and how many tiles each image may use.

InternVL2's conventions, shared by training samples, chat and evaluation:
  * one image and no `<image>` in the text: `<image>\\n` in front of the (first) question;
  * several images: `Image-1: <image>\\nImage-2: <image>\\n...` (the model cards' multi-image
    prompt). InternVL's trainer itself adds nothing for a multi-image record without
    placeholders (it rejects the sample); we add the labelled form instead;
  * a video: `Frame1: <image>\\nFrame2: <image>\\n...`, one placeholder per frame, replacing a
    `<video>` placeholder (training data) or put in front of the question;
  * tile budget: with k > 1 images each is tiled with max(1, max_num // k) tiles
    (`multi_modal_multi_image_get_item`, InternVL's multi-image eval scripts); video frames are
    one tile each.
"""

from __future__ import annotations

from collections.abc import Sequence

from mini_internvl_jax.data.templates import IMAGE_PLACEHOLDER
from mini_internvl_jax.data.video import VideoRef, frame_prefix

VIDEO_PLACEHOLDER = "<video>"


def image_budget(max_num: int, num_images: int) -> int:
    """Tiles (before the thumbnail) each of `num_images` images may use."""
    return max(1, max_num // max(1, num_images))


def num_placeholders(items: Sequence) -> int:
    """`<image>` placeholders a list of images and `VideoRef`s needs (one per frame)."""
    return sum(x.num_frames if isinstance(x, VideoRef) else 1 for x in items)


def media_prefix(items: Sequence, first_image: int = 1) -> str:
    """Placeholder lines for `items` (images and `VideoRef`s) in front of a question.

    `first_image` numbers the first image (a chat turn adding images after earlier ones); a lone
    image that is also the conversation's first gets the bare `<image>\\n`.
    """
    if len(items) == 1 and first_image == 1 and not isinstance(items[0], VideoRef):
        return f"{IMAGE_PLACEHOLDER}\n"
    out, k = [], first_image
    for x in items:
        if isinstance(x, VideoRef):
            out.append(frame_prefix(x.num_frames))
        else:
            out.append(f"Image-{k}: {IMAGE_PLACEHOLDER}\n")
            k += 1
    return "".join(out)


def expand_video_placeholder(text: str, num_frames: int) -> str:
    """Replaces the `<video>` of `text` by the frame lines (InternVL replaces `<video>\\n`; a
    bare `<video>` gets the lines without their final newline)."""
    prefix = frame_prefix(num_frames)
    if f"{VIDEO_PLACEHOLDER}\n" in text:
        return text.replace(f"{VIDEO_PLACEHOLDER}\n", prefix, 1)
    return text.replace(VIDEO_PLACEHOLDER, prefix[:-1], 1)
