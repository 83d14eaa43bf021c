"""Tokenizer parity with the Hugging Face slow tokenizers InternVL trains with.

References, built from transformers 5.24 on the same files:
- Phi-3 (LlamaTokenizer, `use_fast=False` under transformers 4.x): transformers' python
  SentencePieceBackend, i.e. PreTrainedTokenizer.tokenize's added-token split with
  lstrip/rstrip and the "<unk>" trick of `_tokenize`, plus transformers 4.x
  LlamaTokenizer.tokenize (the 7 lines v5 dropped): with legacy=False it prefixes "▁" and removes
  it again only before an `all_special_tokens` entry. InternVL's preprocess_phi3 relies on that
  "▁" (it subtracts 2 tokens for every later turn).
- transformers 5's own `AutoTokenizer(use_fast=False)` on chat strings whose first token is an
  `all_special_tokens` entry (elsewhere it departs from sentencepiece on leading spaces).
- InternLM2: PreTrainedTokenizer with the encoding methods of its remote-code InternLM2Tokenizer.
- Qwen2's vocab.json + merges.txt: transformers' Qwen2Tokenizer over the same files.
"""

import io
import json

import pytest
import sentencepiece as spm
import tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizer, Qwen2Tokenizer
from transformers.tokenization_utils_sentencepiece import SentencePieceBackend

from mini_internvl_jax.convert.hf_config import image_token_id_from_tokenizer
from mini_internvl_jax.data import TokenizerError, load_tokenizer
from mini_internvl_jax.data.tokenizer import IMG_CONTEXT, find_tokenizer, read_added_tokens
from mini_internvl_jax.tools.demo import train_bpe

CORPUS = ["hello world, this is a test of the tokenizer. A red circle is small.\n"
          "New line here.  two  spaces\tand a tab. It is 42."] * 40
ROLES = ("<|assistant|>", "<|end|>", "<|user|>", "<|system|>")
PHI3_ADDED = ("<|endoftext|>",) + ROLES + ("<img>", "</img>", IMG_CONTEXT)
CHAT = [
    "<|system|>\nhello world<|end|><|user|>\n<img><IMG_CONTEXT><IMG_CONTEXT></img>\n"
    "A red circle.\nNew line here.<|end|><|assistant|>\nIt is small.<|end|>",
    "<|user|>\nA red circle.<|end|><|assistant|>\n",
    "<|user|>\n\n  two  spaces \n<|end|><|assistant|>\n   It is 42.\n\n<|end|><|endoftext|>",
]
EDGES = [
    " leading space<|end|>  two spaces after<|user|> x",
    "hello<|end|>\n\nworld\n<|assistant|>   \n  tail  ",
    "\u2581under\u2581line<|end|>\u2581x",
    "<s>hello</s> world </s>x<unk>",
    "héllo wörld 你好<|end|> ünï",
    " ", "\n", "plain text",
]


def _sentencepiece(**kw) -> bytes:
    """A Llama-style model: BPE, byte fallback, identity normalisation, dummy prefix."""
    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buf, vocab_size=400, model_type="bpe",
        character_coverage=1.0, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        hard_vocab_limit=False, normalization_rule_name="identity", add_dummy_prefix=True,
        remove_extra_whitespaces=False, minloglevel=2, **kw)
    return buf.getvalue()


@pytest.fixture(scope="module")
def llama_model():
    return _sentencepiece()


def _entry(content, rstrip=False, lstrip=False, special=True):
    return {"content": content, "lstrip": lstrip, "normalized": False, "rstrip": rstrip,
            "single_word": False, "special": special}


def phi3_folder(path, model, *, legacy, rstrip, add_bos=True, additional=None):
    """Phi-3-mini's tokenizer_config.json layout: `</s>` and the role tokens eat whitespace on
    their right (rstrip), the InternVL tokens follow the base vocabulary."""
    path.mkdir(parents=True)
    (path / "tokenizer.model").write_bytes(model)
    n = spm.SentencePieceProcessor(model_proto=model).get_piece_size()
    dec = {"0": _entry("<unk>"), "1": _entry("<s>"), "2": _entry("</s>", rstrip=True,
                                                                 special=False)}
    for k, tok in enumerate(PHI3_ADDED):
        dec[str(n + k)] = _entry(tok, rstrip=rstrip and tok in ROLES)
    cfg = {"tokenizer_class": "LlamaTokenizer", "legacy": legacy, "add_bos_token": add_bos,
           "add_eos_token": False, "bos_token": "<s>", "eos_token": "<|endoftext|>",
           "pad_token": "<|endoftext|>", "unk_token": "<unk>", "added_tokens_decoder": dec,
           "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}}
    if additional:
        cfg["additional_special_tokens"] = list(additional)
    (path / "tokenizer_config.json").write_text(json.dumps(cfg))
    return path


class SlowLlamaTokenizer(SentencePieceBackend):
    """transformers 4.x slow LlamaTokenizer: SentencePieceBackend + 4.x `tokenize`."""

    def __init__(self, add_bos_token=True, **kwargs):
        self.add_bos_token = add_bos_token
        super().__init__(**kwargs)

    def tokenize(self, text, **kwargs):
        if self.legacy or not text:
            return super().tokenize(text, **kwargs)
        tokens = super().tokenize("\u2581" + text.replace("\u2581", " "), **kwargs)
        if len(tokens) > 1 and tokens[0] == "\u2581" and tokens[1] in self.all_special_tokens:
            tokens = tokens[1:]
        return tokens

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return ([self.bos_token_id] if self.add_bos_token else []) + token_ids_0


class InternLM2Reference(PreTrainedTokenizer):
    """The encoding half of InternLM2's remote-code InternLM2Tokenizer."""

    vocab_files_names = {"vocab_file": "tokenizer.model"}

    def __init__(self, vocab_file, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                 pad_token="</s>", add_bos_token=True, **kwargs):
        self.sp_model = spm.SentencePieceProcessor(model_file=vocab_file)
        self.add_bos_token = add_bos_token
        super().__init__(unk_token=unk_token, bos_token=bos_token, eos_token=eos_token,
                         pad_token=pad_token, **kwargs)

    @property
    def vocab_size(self):
        return self.sp_model.get_piece_size()

    def get_vocab(self):
        vocab = {self.sp_model.id_to_piece(i): i for i in range(self.vocab_size)}
        vocab.update(self.added_tokens_encoder)
        return vocab

    def _tokenize(self, text, **kwargs):
        return self.sp_model.encode(text, out_type=str)

    def _convert_token_to_id(self, token):
        return self.sp_model.piece_to_id(token)

    def _convert_id_to_token(self, index):
        return self.sp_model.id_to_piece(index)

    def build_inputs_with_special_tokens(self, token_ids_0, token_ids_1=None):
        return ([self.sp_model.bos_id()] if self.add_bos_token else []) + token_ids_0


def ours_with_bos(tok, text):
    return ([tok.bos_id] if tok.add_bos else []) + tok.encode(text)


def check_offsets(tok, text):
    """Starts are ordered, inside the text, and a split token starts where its string does."""
    ids, starts = tok.encode_with_offsets(text)
    assert ids == tok.encode(text)
    assert starts == sorted(starts) and all(0 <= s < max(len(text), 1) for s in starts)
    names = {tid: name for name, tid in tok.special_token_ids().items()}
    for tid, s in zip(ids, starts, strict=True):
        if tid in names:
            assert text.startswith(names[tid], s), (text, names[tid], s)


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("rstrip", [False, True])
def test_phi3_style_matches_slow_llama_tokenizer(tmp_path, llama_model, legacy, rstrip):
    folder = phi3_folder(tmp_path / "tok", llama_model, legacy=legacy, rstrip=rstrip)
    ref = SlowLlamaTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder)
    for text in CHAT + EDGES:
        want = ref(text).input_ids
        assert ours_with_bos(ours, text) == want, (text, ref.convert_ids_to_tokens(want))
        check_offsets(ours, text)
    # The cases the flags are about, spelled out: after "<|user|>" legacy mode encodes
    # "\nA" with the dummy prefix ("▁", "\n", "A"); rstrip drops the newline; legacy=False
    # adds no "▁" after a special token but keeps the one before the first "<|user|>", which
    # is not an all_special token here.
    pieces = ref.convert_ids_to_tokens(ours_with_bos(ours, CHAT[1]))
    head = {(True, False): ["<s>", "<|user|>", "\u2581", "\n", "A"],
            (True, True): ["<s>", "<|user|>", "\u2581A"],
            (False, False): ["<s>", "\u2581", "<|user|>", "\n", "A"],
            (False, True): ["<s>", "\u2581", "<|user|>", "A"]}[legacy, rstrip]
    assert pieces[:len(head)] == head


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("rstrip", [False, True])
def test_phi3_style_matches_transformers5_on_chat_strings(tmp_path, llama_model, legacy,
                                                          rstrip):
    folder = phi3_folder(tmp_path / "tok", llama_model, legacy=legacy, rstrip=rstrip,
                         additional=ROLES)
    hf = AutoTokenizer.from_pretrained(str(folder), use_fast=False)
    ours = load_tokenizer(folder)
    for text in CHAT:
        assert ours_with_bos(ours, text) == hf(text).input_ids, text


def test_add_bos_token_false(tmp_path, llama_model):
    folder = phi3_folder(tmp_path / "tok", llama_model, legacy=False, rstrip=True,
                         add_bos=False)
    ref = SlowLlamaTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder)
    assert not ours.add_bos and ours.bos_id == 1
    assert ours_with_bos(ours, CHAT[0]) == ref(CHAT[0]).input_ids


def test_internlm2_matches_its_remote_code_tokenizer(tmp_path):
    model = _sentencepiece(user_defined_symbols=["[UNUSED_TOKEN_145]", "[UNUSED_TOKEN_146]"])
    sp = spm.SentencePieceProcessor(model_proto=model)
    n = sp.get_piece_size()
    folder = tmp_path / "internlm2"
    folder.mkdir()
    (folder / "tokenizer.model").write_bytes(model)
    # <|im_end|>/<|im_start|> rename pieces of the base vocabulary, as in InternLM2's files;
    # </img> eats spaces on its right to exercise the flags.
    dec = {"0": _entry("<unk>"), "1": _entry("<s>"), "2": _entry("</s>"),
           str(sp.piece_to_id("[UNUSED_TOKEN_145]")): _entry("<|im_end|>"),
           str(sp.piece_to_id("[UNUSED_TOKEN_146]")): _entry("<|im_start|>"),
           str(n): _entry("<img>"), str(n + 1): _entry("</img>", rstrip=True),
           str(n + 2): _entry(IMG_CONTEXT)}
    # InternLM2Tokenizer has no legacy switch: a stray "legacy": false must change nothing.
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "InternLM2Tokenizer", "legacy": False, "add_bos_token": True,
        "bos_token": "<s>", "eos_token": "</s>", "pad_token": "</s>", "unk_token": "<unk>",
        "added_tokens_decoder": dec}))
    ref = InternLM2Reference.from_pretrained(str(folder))
    ours = load_tokenizer(folder)
    texts = ["<|im_start|>system\nhello world<|im_end|><|im_start|>user\n<img><IMG_CONTEXT>"
             "</img>\nA red circle.<|im_end|><|im_start|>assistant\nIt is small.<|im_end|>",
             " lead <|im_end|> x", "[UNUSED_TOKEN_146]user", *EDGES]
    for text in texts:
        assert ours_with_bos(ours, text) == ref(text).input_ids, text
    for text in texts[:2] + EDGES:  # (the piece "[UNUSED_TOKEN_146]" is named <|im_start|>)
        check_offsets(ours, text)


@pytest.fixture(scope="module")
def qwen2_files(tmp_path_factory):
    """vocab.json + merges.txt (no tokenizer.json) and a tokenizer_config.json that adds the
    Qwen2 and InternVL special tokens after the base vocabulary."""
    folder = tmp_path_factory.mktemp("qwen2")
    bpe = tokenizers.Tokenizer.from_str(train_bpe(CORPUS + ["Ünïcödé 你好世界 e\u0301"], []))
    bpe.model.save(str(folder))
    n = bpe.get_vocab_size()
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<img>", "</img>", IMG_CONTEXT]
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
        "added_tokens_decoder": {str(n + k): _entry(t) for k, t in enumerate(added)}}))
    return folder, n


def test_qwen2_vocab_and_merges_match_transformers(qwen2_files):
    folder, n = qwen2_files
    assert find_tokenizer(folder).name == "vocab.json"
    ref = Qwen2Tokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder)
    assert not ours.add_bos and ours.token_id(IMG_CONTEXT) == n + 5
    for text in ["<|im_start|>system\nhello world<|im_end|><|im_start|>user\n<img><IMG_CONTEXT>"
                 "</img>\nA red circle.  \n\n x<|im_end|>", " Ünïcödé e\u0301 你好 ",
                 "tail  ", *EDGES]:
        assert ours.encode(text) == ref(text).input_ids, text
        check_offsets(ours, text)
        assert ours.decode(ours.encode(text)) == ref.decode(ref(text).input_ids)


def test_missing_merges_is_a_clear_error(qwen2_files, tmp_path):
    folder, _ = qwen2_files
    half = tmp_path / "half"
    half.mkdir()
    (half / "vocab.json").write_text((folder / "vocab.json").read_text())
    assert find_tokenizer(half) is None
    with pytest.raises(TokenizerError, match="vocab.json is there, merges.txt is not"):
        load_tokenizer(half)
    with pytest.raises(TokenizerError, match="needs merges.txt"):
        load_tokenizer(half / "vocab.json")


def test_added_token_without_content_is_a_clear_error(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"added_tokens_decoder": {"7": {"content": "<a>"}, "8": {"lstrip": False}}}))
    with pytest.raises(TokenizerError, match=r"added_tokens_decoder\['8'\] has no content"):
        read_added_tokens(tmp_path)


def test_image_context_id_is_read_as_transformers_reads_it(tmp_path, llama_model):
    folder = phi3_folder(tmp_path / "tok", llama_model, legacy=True, rstrip=False)
    n = spm.SentencePieceProcessor(model_proto=llama_model).get_piece_size()
    want = n + PHI3_ADDED.index(IMG_CONTEXT)
    # added_tokens.json is ignored next to an added_tokens_decoder
    (folder / "added_tokens.json").write_text(json.dumps({IMG_CONTEXT: 7}))
    hf = AutoTokenizer.from_pretrained(str(folder), use_fast=False)
    assert hf.convert_tokens_to_ids(IMG_CONTEXT) == want
    assert load_tokenizer(folder).token_id(IMG_CONTEXT) == want
    assert image_token_id_from_tokenizer(folder) == (want, "tokenizer_config.json")
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    del cfg["added_tokens_decoder"]
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert load_tokenizer(folder).token_id(IMG_CONTEXT) == 7
    assert image_token_id_from_tokenizer(folder) == (7, "added_tokens.json")


@pytest.mark.parametrize("legacy", [True, False])
@pytest.mark.parametrize("rstrip", [False, True])
def test_text_after_a_spliced_special_token(tmp_path, llama_model, legacy, rstrip):
    """`after=`: the ids a run has inside the whole prompt, where image ids are spliced in."""
    folder = phi3_folder(tmp_path / "tok", llama_model, legacy=legacy, rstrip=rstrip)
    ref = SlowLlamaTokenizer.from_pretrained(str(folder))
    ours = load_tokenizer(folder)
    for head, after in (("<|user|>\n<img><IMG_CONTEXT></img>", "</img>"),
                        ("x<|user|>", "<|user|>")):
        for text in ["\nWhat is it?<|end|><|assistant|>\n", "  two  spaces", CHAT[0]]:
            whole = ref(head + text, add_special_tokens=False).input_ids
            ids, starts = ours.encode_with_offsets(text, after=after)
            assert ids == whole[len(ref(head, add_special_tokens=False).input_ids):], text
            assert starts == sorted(starts) and all(0 <= s < len(text) for s in starts)


@pytest.mark.parametrize("legacy", [True, False])
def test_phi3_chat_with_images_matches_encoding_of_the_rendered_prompt(tmp_path, llama_model,
                                                                         legacy):
    """encode_chat splices image ids in; the result must equal the reference tokenizer's
    encoding of the whole rendered prompt (images expanded), also for legacy=False."""
    from mini_internvl_jax.data.templates import encode_chat, get_template, render

    folder = phi3_folder(tmp_path / "tok", llama_model, legacy=legacy, rstrip=True)
    ref = SlowLlamaTokenizer.from_pretrained(str(folder))
    template = get_template("phi3-chat")
    messages = [("human", "<image>\nWhat is  shown?"), ("gpt", "A red circle."),
                ("human", "Image-2: <image>\n and this?"), ("gpt", " Two squares.")]
    counts = [3, 2]
    encoded = encode_chat(load_tokenizer(folder), template, messages, counts)
    text = render(template, messages)
    for n in counts:  # expanded here by hand, independently of `render`
        text = text.replace("<image>", "<img>" + IMG_CONTEXT * n + "</img>", 1)
    assert encoded.input_ids.tolist() == ref(text).input_ids
