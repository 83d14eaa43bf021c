"""Tokenizer compatibility mode: transformers 4.37's slow Qwen2Tokenizer (InternVL2's
fine-tuning tokenizer) skipped every merges.txt line starting with "#". The default keeps all
merges (current transformers, fast tokenizers); `merges_compat="4.37"` drops those lines.

References: transformers' Qwen2Tokenizer over the test's files (default), and over a copy whose
merges.txt has the "#" lines removed (the documented 4.37 behaviour, built independently).
"""

import json

import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers
from transformers import Qwen2Tokenizer

from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.data.config import data_config_from_dict
from mini_internvl_jax.data.errors import DataError, TokenizerError
from mini_internvl_jax.data.pipeline import build_train_dataset
from mini_internvl_jax.data.tokenizer import load_tokenizer

CORPUS = ["## Heading\n### Sub-heading #1 and #2", "#include <stdio.h>\n#define N 3",
          "a # comment ## and ### more ####", "plain words here, hash#tag #hashtag"] * 20
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
TEXTS = ["## Heading", "#include #define ####", "x # y ## z", "#hashtag and plain words",
         "<|im_start|>user\n### Q #1<|im_end|>"]


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """(full, dropped): vocab.json + merges.txt with "#" merges, and the same files with every
    merges line starting with "#" removed (the header line is skipped by both readers)."""
    tok = tokenizers.Tokenizer(models.BPE())
    # Qwen2's split (punctuation joins a following word: "#include"), then bytes
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(tokenizers.Regex(QWEN2_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(CORPUS, trainers.BpeTrainer(
        vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    full = tmp_path_factory.mktemp("full")
    tok.model.save(str(full))
    n = tok.get_vocab_size()
    added = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    config = json.dumps({
        "tokenizer_class": "Qwen2Tokenizer", "bos_token": None, "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>", "unk_token": None, "add_prefix_space": False,
        "added_tokens_decoder": {str(n + k): {"content": t, "special": True, "lstrip": False,
                                              "rstrip": False, "normalized": False,
                                              "single_word": False}
                                 for k, t in enumerate(added)}})
    (full / "tokenizer_config.json").write_text(config)
    lines = (full / "merges.txt").read_text().splitlines()
    hashed = [x for x in lines[1:] if x.startswith("#")]
    assert lines[0].startswith("#version") and len(hashed) >= 4, hashed  # "# #", "#in clude", ...
    dropped = tmp_path_factory.mktemp("dropped")
    (dropped / "vocab.json").write_text((full / "vocab.json").read_text())
    (dropped / "merges.txt").write_text("\n".join(
        [lines[0]] + [x for x in lines[1:] if not x.startswith("#")]) + "\n")
    (dropped / "tokenizer_config.json").write_text(config)
    return full, dropped


def _ids(tok, text):
    return tok(text)["input_ids"] if callable(tok) else tok.encode(text)


def test_default_keeps_hash_merges_and_compat_reproduces_4_37(folders, tmp_path):
    full, dropped = folders
    current, old = Qwen2Tokenizer.from_pretrained(str(full)), \
        Qwen2Tokenizer.from_pretrained(str(dropped))
    default, compat = load_tokenizer(full), load_tokenizer(full, merges_compat="4.37")
    assert compat.merges_compat == "4.37" and default.merges_compat is None
    differ = 0
    for text in TEXTS:
        assert default.encode(text) == _ids(current, text), text
        assert compat.encode(text) == _ids(old, text), text
        assert compat.decode(compat.encode(text)) == text
        differ += default.encode(text) != compat.encode(text)
    assert differ >= 3  # the two modes really tokenize "#" runs differently

    # a tokenizer.json (as a fast tokenizer saves it) follows the same setting
    current.save_pretrained(str(tmp_path))
    assert (tmp_path / "tokenizer.json").is_file()
    fast_compat = load_tokenizer(tmp_path, kind="hf", merges_compat="4.37")
    fast_default = load_tokenizer(tmp_path, kind="hf")
    for text in TEXTS:
        assert fast_compat.encode(text) == _ids(old, text), text
        assert fast_default.encode(text) == _ids(current, text), text


def test_merges_compat_setting_is_checked(folders):
    full, _ = folders
    with pytest.raises(TokenizerError, match="merges_compat '4.36'"):
        load_tokenizer(full, merges_compat="4.36")
    cfg = data_config_from_dict({"meta_path": "m.json", "merges_compat": "4.37"})
    assert cfg.merges_compat == "4.37"
    assert data_config_from_dict({"meta_path": "m.json"}).merges_compat is None
    with pytest.raises(ConfigError, match="merges_compat"):
        data_config_from_dict({"meta_path": "m.json", "merges_compat": 4.37})
    # a tokenizer object loaded without the mode cannot silently serve a "4.37" config
    with pytest.raises(DataError, match="merges_compat"):
        build_train_dataset(cfg, tokenizer=load_tokenizer(full), num_image_tokens=4,
                            image_size=56, seq_len=64, batch_size=1, max_tiles=1, seed=0,
                            shard_index=0, shard_count=1, template="Hermes-2")
