"""The `internvl2_5` template (InternVL2.5 / InternVL3 / InternVL3.5) against the released Jinja
chat template rendered by transformers' `apply_chat_template`, and its label mask against
InternVL's own `preprocess_internvl2_5` rule (each turn tokenized on its own; an assistant turn
trains its content and `<|im_end|>`, never its role header or the newline after `<|im_end|>`).
"""

import dataclasses

import numpy as np
import pytest
import tokenizers
import transformers

from mini_internvl_jax.data import load_tokenizer, stop_token_ids
from mini_internvl_jax.data.media import expand_video_placeholder
from mini_internvl_jax.data.templates import (
    INTERNVL2_5_SYSTEM_MESSAGE,
    encode_chat,
    get_template,
)
from mini_internvl_jax.tools.demo import train_bpe

# The chat template transformers' InternVL converter (convert_internvl_weights_to_hf.py) ships
# with the InternVL2.5 / InternVL3 `-hf` checkpoints, verbatim.
RELEASED_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}"
    "{{ message['content'] }}"
    "{% else %}"
    "{% for content in message['content'] %}"
    "{% if content['type'] == 'image' %}"
    "{{ '<image>\n' }}"
    "{% elif content['type'] == 'video' %}"
    "{{ '<video>\n' }}"
    "{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}"
    "{% endif %}"
    "{% endfor %}"
    "{% endif %}"
    "{{'<|im_end|>\n'}}"
    "{% endfor %}"
    "{% if add_generation_prompt %}"
    "{{'<|im_start|>assistant\n' }}"
    "{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", "<IMG_CONTEXT>",
            "<quad>", "</quad>", "<ref>", "</ref>", "<box>", "</box>"]
PER_TILE = 3  # <IMG_CONTEXT> per tile in these tests (256 in the real models)


def _text(t):
    return {"type": "text", "text": t}


# (InternVL data turns, the same conversation as chat messages, tiles per image, video frames)
CASES = {
    "multi_turn": (
        [("human", "<image>\nWhat is shown?"), ("gpt", "A red circle."),
         ("human", "And its size?"), ("gpt", "It is small.\n\nVery small.")],
        [{"role": "user", "content": [{"type": "image"}, _text("What is shown?")]},
         {"role": "assistant", "content": "A red circle."},
         {"role": "user", "content": "And its size?"},
         {"role": "assistant", "content": "It is small.\n\nVery small."}],
        [2], 0),
    "multi_image": (
        [("human", "Image-1: <image>\nImage-2: <image>\nCompare them."),
         ("gpt", "The first is larger.")],
        [{"role": "user", "content": [_text("Image-1: "), {"type": "image"}, _text("Image-2: "),
                                      {"type": "image"}, _text("Compare them.")]},
         {"role": "assistant", "content": "The first is larger."}],
        [3, 1], 0),
    "video": (
        [("human", "<video>\nWhat happens?"), ("gpt", "A ball rolls away.")],
        [{"role": "user", "content": [{"type": "video"}, _text("What happens?")]},
         {"role": "assistant", "content": "A ball rolls away."}],
        [], 3),
}


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory):
    corpus = [INTERNVL2_5_SYSTEM_MESSAGE, "What is shown? A red circle. And its size?",
              "It is small.\n\nVery small. Image-1: Image-2: Compare them. The first is larger.",
              "Frame1: Frame2: What happens? A ball rolls away.\n"] * 20
    folder = tmp_path_factory.mktemp("tok")
    (folder / "tokenizer.json").write_text(train_bpe(corpus, SPECIALS))
    return folder


def released(tokenizer_dir, messages, tiles, frames, add_generation_prompt=False):
    """(ids, the per-turn strings) as the released template + InternVL's processor build them."""
    hf = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tokenizers.Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json")),
        chat_template=RELEASED_CHAT_TEMPLATE)
    msgs = [{"role": "system", "content": INTERNVL2_5_SYSTEM_MESSAGE}] + messages
    text = hf.apply_chat_template(msgs, tokenize=False,
                                  add_generation_prompt=add_generation_prompt)
    # InternVLProcessor: each <image> -> <img> + <IMG_CONTEXT> x (tokens x tiles) + </img>,
    # each <video> -> "Frame{i}: <img>...</img>" lines joined by "\n".
    for n in tiles:
        text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * PER_TILE * n + "</img>", 1)
    text = text.replace("<video>", "\n".join(
        f"Frame{i + 1}: <img>" + "<IMG_CONTEXT>" * PER_TILE + "</img>" for i in range(frames)))
    ids = hf(text, add_special_tokens=False)["input_ids"]
    turns = [t + "<|im_end|>\n" for t in text.split("<|im_end|>\n")[:-1]]
    assert "".join(turns) + text[len("".join(turns)):] == text
    return hf, ids, turns


def internvl_labels(hf, turns) -> list[bool]:
    """preprocess_internvl2_5: tokenize each turn alone; in assistant turns mask the
    `<|im_start|>assistant\\n` header and the final `\\n`, train the rest."""
    header = len(hf("<|im_start|>assistant\n", add_special_tokens=False)["input_ids"])
    trained: list[bool] = []
    for turn in turns:
        n = len(hf(turn, add_special_tokens=False)["input_ids"])
        if turn.startswith("<|im_start|>assistant\n"):
            trained += [False] * header + [True] * (n - header - 1) + [False]
        else:
            trained += [False] * n
    return trained


def ours(tokenizer_dir, turns, tiles, frames, template=None, add_generation_prompt=False):
    tok = load_tokenizer(tokenizer_dir)
    if frames:
        turns = [(r, expand_video_placeholder(t, frames)) for r, t in turns]
        tiles = [1] * frames
    t = template or get_template("internvl2_5")
    return tok, t, encode_chat(tok, t, turns, [PER_TILE * n for n in tiles],
                               add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("case", list(CASES))
def test_ids_and_labels_equal_the_released_template(tokenizer_dir, case):
    turns, messages, tiles, frames = CASES[case]
    hf, want_ids, hf_turns = released(tokenizer_dir, messages, tiles, frames)
    tok, t, enc = ours(tokenizer_dir, turns, tiles, frames)
    assert enc.input_ids.tolist() == want_ids
    # InternVL tokenizes turn by turn; with <|im_end|>\n boundaries that is the same ids
    assert sum((hf(x, add_special_tokens=False)["input_ids"] for x in hf_turns), []) == want_ids
    np.testing.assert_array_equal(enc.trained, internvl_labels(hf, hf_turns))
    answers = [m for r, m in turns if r == "gpt"]
    assert tok.decode(enc.input_ids[enc.trained]) == "".join(a + "<|im_end|>" for a in answers)
    # generation: the open assistant turn after "<|im_end|>\n", stopping at <|im_end|>
    _, gen_ids, _ = released(tokenizer_dir, messages[:1], tiles, frames,
                             add_generation_prompt=True)
    _, _, gen = ours(tokenizer_dir, turns[:1], tiles, frames, add_generation_prompt=True)
    assert gen.input_ids.tolist() == gen_ids and not gen.trained.any()
    assert stop_token_ids(tok, t)[0] == tok.token_id("<|im_end|>")


def test_dropping_the_separator_newline_changes_ids(tokenizer_dir):
    """The test above depends on the newline: InternVL2's Hermes-2 separator (no newline) on
    the same conversation does not reproduce the released ids."""
    turns, messages, tiles, frames = CASES["multi_turn"]
    _, want_ids, _ = released(tokenizer_dir, messages, tiles, frames)
    no_newline = dataclasses.replace(get_template("internvl2_5"), sep="<|im_end|>")
    _, _, enc = ours(tokenizer_dir, turns, tiles, frames, template=no_newline)
    assert enc.input_ids.tolist() != want_ids
    assert len(enc.input_ids) == len(want_ids) - 5  # one "\n" per turn (system + 4)
