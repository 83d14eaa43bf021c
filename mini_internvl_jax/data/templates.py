"""InternVL chat templates (`Hermes-2`, `internlm2-chat`, `phi3-chat`, `internvl2_5`) and
label masking.

All are InternVL's MPT style: `system + sep`, then `role + message + sep` per turn and a bare
`role` for an open assistant turn. InternVL2's three have no newline after `sep`; `internvl2_5`
(InternVL2.5, InternVL3 and InternVL3.5: the `template` of their config.json) uses
`<|im_end|>\n` and its own system message. Training targets are the assistant content plus the
end-of-turn token that closes it (`end_token`; internvl2_5's newline after it is not trained, as
InternVL's `preprocess_internvl2_5` masks it); everything else (system prompt, user turns, role
headers, BOS, image tokens, Phi-3's `<|endoftext|>`) is masked.

Image placeholders are not tokenized from text: each `<image>` becomes the ids of `<img>`,
`<IMG_CONTEXT>` x n, `</img>` directly, which is the same as tokenizing the expanded string
because all three are special tokens, and saves tokenizing ~1,500 tokens per sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mini_internvl_jax.data.tokenizer import IMG_CONTEXT, IMG_END, IMG_START, Tokenizer

IMAGE_PLACEHOLDER = "<image>"
DEFAULT_SYSTEM_MESSAGE = (
    "你是由上海人工智能实验室联合商汤科技开发的书生多模态大模型，英文名叫InternVL, "
    "是一个有用无害的人工智能助手。"
)
# internvl2_5's system message (InternVL's conversation.py; InternVL2's templates keep the older
# one above "to avoid changes in benchmark performance").
INTERNVL2_5_SYSTEM_MESSAGE = (
    "你是书生·万象，英文名是InternVL，是由上海人工智能实验室、清华大学及多家合作单位联合开发的"
    "多模态大语言模型。"
)
HUMAN, GPT = "human", "gpt"


@dataclass(frozen=True)
class ChatTemplate:
    name: str
    system_template: str
    user_role: str
    assistant_role: str
    sep: str
    # Strings of the template that must be single special tokens of the vocabulary.
    special_tokens: tuple[str, ...]
    # InternVL's InternLM2 preprocessing strips every message before rendering (training only).
    strip_messages: bool = False
    # Tokens never trained on even inside assistant content (Phi-3 masks <|endoftext|>).
    never_trained: tuple[str, ...] = ()
    system_message: str = DEFAULT_SYSTEM_MESSAGE
    # The trained, generation-ending part of `sep` (the whole `sep` when empty).
    end_token: str = ""

    @property
    def stop(self) -> str:
        """The token that ends an assistant turn (and generation)."""
        return self.end_token or self.sep


_HERMES_2 = ChatTemplate(
    name="Hermes-2", system_template="<|im_start|>system\n{system_message}",
    user_role="<|im_start|>user\n", assistant_role="<|im_start|>assistant\n",
    sep="<|im_end|>", special_tokens=("<|im_start|>", "<|im_end|>"))

TEMPLATES: dict[str, ChatTemplate] = {
    "Hermes-2": _HERMES_2,
    # The same ChatML markup; only the message stripping differs.
    "internlm2-chat": dataclasses.replace(_HERMES_2, name="internlm2-chat", strip_messages=True),
    "phi3-chat": ChatTemplate(
        name="phi3-chat", system_template="<|system|>\n{system_message}",
        user_role="<|user|>\n", assistant_role="<|assistant|>\n", sep="<|end|>",
        special_tokens=("<|system|>", "<|user|>", "<|assistant|>", "<|end|>"),
        never_trained=("<|endoftext|>",)),
    "internvl2_5": dataclasses.replace(_HERMES_2, name="internvl2_5", sep="<|im_end|>\n",
                                       end_token="<|im_end|>",
                                       system_message=INTERNVL2_5_SYSTEM_MESSAGE),
}


def get_template(name: str) -> ChatTemplate:
    if name not in TEMPLATES:
        raise ValueError(f"unknown chat template {name!r}; known: {sorted(TEMPLATES)}")
    return TEMPLATES[name]


def image_token_string(num_tokens: int) -> str:
    return IMG_START + IMG_CONTEXT * num_tokens + IMG_END


def render(template: ChatTemplate, messages: Sequence[tuple[str, str]], *,
           system_message: str | None = None, add_generation_prompt: bool = False,
           image_token_counts: Sequence[int] | None = None) -> str:
    """The exact prompt string InternVL builds; `<image>`s expanded when counts are given."""
    sys_msg = template.system_message if system_message is None else system_message
    out = template.system_template.format(system_message=sys_msg) + template.sep
    for role, text in messages:
        role_str = template.user_role if role == HUMAN else template.assistant_role
        out += role_str + text + template.sep if text else role_str
    if add_generation_prompt:
        out += template.assistant_role
    for n in image_token_counts or ():
        out = out.replace(IMAGE_PLACEHOLDER, image_token_string(n), 1)
    return out


def _pieces(template: ChatTemplate, messages, system_message, add_generation_prompt):
    """(text, trained) pieces in prompt order; mirrors `render`."""
    sys_msg = template.system_message if system_message is None else system_message
    yield template.system_template.format(system_message=sys_msg) + template.sep, False
    for role, text in messages:
        if role == HUMAN:
            yield (template.user_role + text + template.sep, False) if text else (
                template.user_role, False)
        elif role == GPT:
            yield template.assistant_role, False
            if text:
                yield text, True
                yield template.stop, True
                if template.sep != template.stop:
                    yield template.sep[len(template.stop):], False
        else:
            raise ValueError(f"role {role!r} is not {HUMAN!r} or {GPT!r}")
    if add_generation_prompt:
        yield template.assistant_role, False


@dataclass
class EncodedChat:
    input_ids: np.ndarray  # int32 [L]
    trained: np.ndarray  # bool [L]: token is a training target
    image_spans: list[tuple[int, int]]  # [start, end) of each <img>..</img>, in order


def count_placeholders(messages: Sequence[tuple[str, str]]) -> int:
    return sum(text.count(IMAGE_PLACEHOLDER) for _, text in messages)


def encode_chat(tokenizer: Tokenizer, template: ChatTemplate,
                messages: Sequence[tuple[str, str]], image_token_counts: Sequence[int] = (),
                *, system_message: str | None = None,
                add_generation_prompt: bool = False) -> EncodedChat:
    """Token ids and target mask of a conversation, images spliced in as ids.

    `image_token_counts[k]` is the number of <IMG_CONTEXT> tokens for the k-th `<image>`
    in prompt order (num_image_tokens x tiles). Text between images is tokenized as whole
    runs so ids equal the tokenizer's encoding of `render(...)`; the target mask comes from
    each token's start character.
    """
    n_ph = count_placeholders(messages)
    if n_ph != len(image_token_counts):
        raise ValueError(f"{n_ph} {IMAGE_PLACEHOLDER} placeholder(s) for "
                         f"{len(image_token_counts)} image(s)")
    img_start = tokenizer.token_id(IMG_START, "image placeholders")
    img_end = tokenizer.token_id(IMG_END, "image placeholders")
    img_ctx = tokenizer.token_id(IMG_CONTEXT, "image placeholders")

    ids: list[int] = []
    trained: list[bool] = []
    spans: list[tuple[int, int]] = []
    if tokenizer.add_bos:
        assert tokenizer.bos_id is not None, "a tokenizer with add_bos has a BOS id (load checks)"
        ids.append(tokenizer.bos_id)
        trained.append(False)
    run_text: list[str] = []
    run_flags: list[tuple[int, bool]] = []  # (length, trained) per text fragment
    after_image = False  # a run right after </img> encodes as in the whole rendered prompt

    def flush():
        if not run_text:
            return
        text = "".join(run_text)
        tok_ids, starts = tokenizer.encode_with_offsets(text,
                                                        after=IMG_END if after_image else None)
        char_trained = np.repeat([f for _, f in run_flags], [n for n, _ in run_flags])
        ids.extend(tok_ids)
        trained.extend(char_trained[np.asarray(starts, dtype=np.int64)].tolist())
        run_text.clear()
        run_flags.clear()

    counts = iter(image_token_counts)
    for text, is_trained in _pieces(template, messages, system_message, add_generation_prompt):
        parts = text.split(IMAGE_PLACEHOLDER)
        for k, part in enumerate(parts):
            if k > 0:
                flush()
                n = next(counts)
                spans.append((len(ids), len(ids) + n + 2))
                ids.extend([img_start] + [img_ctx] * n + [img_end])
                trained.extend([False] * (n + 2))
                after_image = True
            if part:
                run_text.append(part)
                run_flags.append((len(part), is_trained))
    flush()

    input_ids = np.asarray(ids, dtype=np.int32)
    trained_arr = np.asarray(trained, dtype=bool)
    for tok in template.never_trained:
        tid = tokenizer.find_token(tok)
        if tid is not None:
            trained_arr &= input_ids != tid
    return EncodedChat(input_ids=input_ids, trained=trained_arr, image_spans=spans)


def stop_token_ids(tokenizer: Tokenizer, template: ChatTemplate) -> tuple[int, ...]:
    """Ids that end generation; the first (the template's `sep`) is what InternVL's chat()
    uses as eos_token_id, the others (tokenizer EOS, `<|endoftext|>`) are safety stops."""
    out = [tokenizer.token_id(template.stop, f"template {template.name}")]
    for tid in (tokenizer.eos_id, tokenizer.find_token("<|endoftext|>")):
        if tid is not None and tid not in out:
            out.append(tid)
    return tuple(out)
