"""Templates, label masks and tokenizers.

Ids are checked against each tokenizer library's own encoding of the rendered string
(sentencepiece / `tokenizers` called directly); strings and masks against hand-written
expectations.
"""

import json
import pickle

import numpy as np
import pytest
import sentencepiece as spm
import tokenizers

from mini_internvl_jax.data import TokenizerError, load_tokenizer, stop_token_ids
from mini_internvl_jax.data.templates import (
    DEFAULT_SYSTEM_MESSAGE,
    encode_chat,
    get_template,
    render,
)
from mini_internvl_jax.tools.demo import train_bpe, write_demo

FAMILIES = {"qwen2": "Hermes-2", "internlm2": "internlm2-chat", "phi3": "phi3-chat"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo") / "d"
    write_demo(root, num_stage1=24, num_stage2=24)
    return root


def raw_encode(demo, family, text):
    """The tokenizer library's own encoding (plus BOS for the sentencepiece families)."""
    folder = demo / "tokenizers" / family
    if family == "qwen2":
        tok = tokenizers.Tokenizer.from_file(str(folder / "tokenizer.json"))
        return tok.encode(text, add_special_tokens=False).ids
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    return [sp.bos_id()] + sp.encode(text)


S = DEFAULT_SYSTEM_MESSAGE
TWO_TURNS = [("human", "<image>\nWhat is shown?"), ("gpt", "A red circle."),
             ("human", "And its size?"), ("gpt", "It is small.")]
EXPECTED = {
    "Hermes-2": (
        f"<|im_start|>system\n{S}<|im_end|><|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
        "<|im_start|>assistant\nA red circle.<|im_end|><|im_start|>user\nAnd its size?<|im_end|>"
        "<|im_start|>assistant\nIt is small.<|im_end|>"),
    "phi3-chat": (
        f"<|system|>\n{S}<|end|><|user|>\n<image>\nWhat is shown?<|end|><|assistant|>\n"
        "A red circle.<|end|><|user|>\nAnd its size?<|end|><|assistant|>\nIt is small.<|end|>"),
}
EXPECTED["internlm2-chat"] = EXPECTED["Hermes-2"]


@pytest.mark.parametrize("name", list(FAMILIES.values()))
def test_rendered_strings_are_exact(name):
    t = get_template(name)
    assert render(t, TWO_TURNS) == EXPECTED[name]
    gen = render(t, TWO_TURNS[:1], add_generation_prompt=True)
    head = EXPECTED[name][:EXPECTED[name].index("A red circle.")]
    assert gen == head  # open assistant turn: the role alone, no separator
    expanded = render(t, TWO_TURNS, image_token_counts=[3])
    assert "<img><IMG_CONTEXT><IMG_CONTEXT><IMG_CONTEXT></img>\nWhat" in expanded
    assert render(t, TWO_TURNS, system_message="Be brief.").count("Be brief.") == 1


def _spans(demo, family, text, answers_with_sep):
    """Trained token ranges by cumulative encoding (InternVL's own masking method)."""
    ranges, pos = [], 0
    for ans in answers_with_sep:
        cut = text.index(ans, pos)
        start = len(raw_encode(demo, family, text[:cut]))
        end = len(raw_encode(demo, family, text[:cut + len(ans)]))
        ranges.append((start, end))
        pos = cut + len(ans)
    return ranges


CASES = {
    "multi_turn": (TWO_TURNS, [4]),
    "multi_image": ([("human", "Image-1: <image>\nImage-2: <image>\nCompare them."),
                     ("gpt", "The first is larger."), ("human", "Why?"),
                     ("gpt", "It has more area.")], [8, 12]),
    "text_only": ([("human", "What is 2 plus 3?"), ("gpt", "2 plus 3 is 5.")], []),
}


@pytest.mark.parametrize("family", list(FAMILIES))
@pytest.mark.parametrize("case", list(CASES))
def test_ids_and_labels(demo, family, case):
    msgs, counts = CASES[case]
    t = get_template(FAMILIES[family])
    tok = load_tokenizer(demo / "tokenizers" / family)
    enc = encode_chat(tok, t, msgs, [c for c in counts])
    text = render(t, msgs, image_token_counts=counts)
    want_ids = raw_encode(demo, family, text)
    assert enc.input_ids.tolist() == want_ids
    answers = [m + t.sep for r, m in msgs if r == "gpt"]
    for ans in answers:  # boundaries must be clean for the cumulative method to apply
        assert text.count(ans) == 1
    want = np.zeros(len(want_ids), bool)
    for a, b in _spans(demo, family, text, answers):
        want[a:b] = True
    np.testing.assert_array_equal(enc.trained, want)
    assert tok.decode(enc.input_ids[enc.trained]) == "".join(answers)
    ctx = tok.token_id("<IMG_CONTEXT>")
    assert int((enc.input_ids == ctx).sum()) == sum(counts)
    assert not enc.trained[enc.input_ids == ctx].any()
    assert [e - s - 2 for s, e in enc.image_spans] == counts
    if tok.add_bos:
        assert enc.input_ids[0] == tok.bos_id and not enc.trained[0]


def test_token_straddling_the_answer_start_is_masked(tmp_path):
    # Qwen2's pre-tokenizer keeps "\n\n" together: "assistant\n" + "\nDone" puts the first
    # answer character inside the role header's newline token (when "\n\n" is one token).
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>",
                "<IMG_CONTEXT>"]
    (tmp_path / "tokenizer.json").write_text(
        train_bpe(["para one\n\npara two\n\nDone"] * 50, specials))
    tok = load_tokenizer(tmp_path)
    t = get_template("Hermes-2")
    msgs = [("human", "Go"), ("gpt", "\nDone")]
    enc = encode_chat(tok, t, msgs)
    raw = tokenizers.Tokenizer.from_file(str(tmp_path / "tokenizer.json"))
    assert enc.input_ids.tolist() == raw.encode(render(t, msgs), add_special_tokens=False).ids
    nl2 = tok.encode("\n\n")
    assert len(nl2) == 1 and nl2[0] in enc.input_ids.tolist()
    k = enc.input_ids.tolist().index(nl2[0])
    assert not enc.trained[k] and enc.trained[k + 1:].all()


def test_phi3_endoftext_never_trained(demo):
    tok = load_tokenizer(demo / "tokenizers" / "phi3")
    enc = encode_chat(tok, get_template("phi3-chat"), [("human", "Hi"),
                                                      ("gpt", "Bye<|endoftext|> now")])
    eot = tok.token_id("<|endoftext|>")
    assert eot in enc.input_ids.tolist()
    assert not enc.trained[enc.input_ids == eot].any()
    assert tok.decode(enc.input_ids[enc.trained]) == "Bye now<|end|>"


def test_generation_prompt_and_stop_ids(demo):
    for family, name in FAMILIES.items():
        tok = load_tokenizer(demo / "tokenizers" / family)
        t = get_template(name)
        enc = encode_chat(tok, t, [("human", "Hello")], add_generation_prompt=True)
        assert enc.input_ids.tolist() == raw_encode(
            demo, family, render(t, [("human", "Hello")], add_generation_prompt=True))
        assert not enc.trained.any()
        stops = stop_token_ids(tok, t)
        assert stops[0] == tok.token_id(t.sep)


def test_special_token_ids_and_vocab(demo):
    for family in FAMILIES:
        tok = load_tokenizer(demo / "tokenizers" / family)
        ids = tok.special_token_ids()
        assert (ids["<img>"], ids["</img>"], ids["<IMG_CONTEXT>"]) == (3, 4, 5)
        assert len({ids[t] for t in ("<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                                     "</box>")}) == 6
        assert tok.vocab_size <= 512
        again = pickle.loads(pickle.dumps(tok))
        assert again.encode("<img>a b</img>") == tok.encode("<img>a b</img>")


def test_missing_special_token_is_a_clear_error(tmp_path):
    tok = tokenizers.Tokenizer(tokenizers.models.BPE())
    tok.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.train_from_iterator(["hello world"] * 10, tokenizers.trainers.BpeTrainer(
        vocab_size=300, special_tokens=["<|im_start|>", "<|im_end|>", "<img>"],
        show_progress=False))
    (tmp_path / "tokenizer.json").write_text(tok.to_str())
    t = load_tokenizer(tmp_path)
    with pytest.raises(TokenizerError, match=r"<IMG_CONTEXT>"):
        t.token_id("<IMG_CONTEXT>")
    with pytest.raises(TokenizerError, match=r"'</img>', '<IMG_CONTEXT>'"):
        t.require(["<img>", "</img>", "<IMG_CONTEXT>"], "images")
    with pytest.raises(TokenizerError, match="<IMG_CONTEXT>"):
        encode_chat(t, get_template("Hermes-2"), [("human", "<image>\nhi"), ("gpt", "x")], [4])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="neither tokenizer.model"):
        load_tokenizer(tmp_path / "empty")
    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nowhere")


def test_added_tokens_json_extends_both_kinds(tmp_path):
    buf = __import__("io").BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(["hello world, a test of the tokenizer"] * 20), model_writer=buf,
        vocab_size=60, model_type="bpe", character_coverage=1.0, minloglevel=2,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], hard_vocab_limit=False)
    sp_dir = tmp_path / "sp"
    sp_dir.mkdir()
    (sp_dir / "tokenizer.model").write_bytes(buf.getvalue())
    n = spm.SentencePieceProcessor(model_proto=buf.getvalue()).get_piece_size()
    added = {t: n + k for k, t in enumerate(["<img>", "</img>", "<IMG_CONTEXT>"])}
    (sp_dir / "added_tokens.json").write_text(json.dumps(added))
    tok = load_tokenizer(sp_dir)
    assert tok.vocab_size == n + 3 and tok.token_id("<IMG_CONTEXT>") == n + 2
    ids = tok.encode("hello<img><IMG_CONTEXT></img> world")
    assert [i for i in ids if i >= n] == [n, n + 2, n + 1]
    assert tok.decode(ids) == "hello<img><IMG_CONTEXT></img> world"
    # an added token may rename an existing piece (InternLM2's [UNUSED_TOKEN_146] style)
    (sp_dir / "added_tokens.json").write_text(json.dumps({**added, "<|alias|>": 4}))
    tok = load_tokenizer(sp_dir)
    assert tok.encode("hello<|alias|>") == tok.encode("hello") + [4]
    assert tok.decode([4]) == "<|alias|>"

    hf = tokenizers.Tokenizer(tokenizers.models.BPE())
    hf.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    hf.train_from_iterator(["hello world"] * 5, tokenizers.trainers.BpeTrainer(
        vocab_size=270, special_tokens=["<|im_end|>"], show_progress=False))
    hf_dir = tmp_path / "hf"
    hf_dir.mkdir()
    (hf_dir / "tokenizer.json").write_text(hf.to_str())
    m = hf.get_vocab_size()
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
        str(m + k): {"content": t} for k, t in enumerate(["<img>", "</img>", "<IMG_CONTEXT>"])
    }}))
    tok = load_tokenizer(hf_dir)
    assert tok.token_id("</img>") == m + 1
    assert tok.encode("h<IMG_CONTEXT>e")[1] == m + 2
    # as in transformers, added_tokens.json only counts without an added_tokens_decoder
    (hf_dir / "added_tokens.json").write_text(json.dumps({"<img>": m + 5}))
    assert load_tokenizer(hf_dir).token_id("<img>") == m
    (hf_dir / "tokenizer_config.json").unlink()
    with pytest.raises(TokenizerError, match=r"should have id \d+ \(added_tokens.json\)"):
        load_tokenizer(hf_dir)
