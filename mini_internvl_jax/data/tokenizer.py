"""One tokenizer interface over sentencepiece `tokenizer.model`, `tokenizer.json` and Qwen2's
`vocab.json` + `merges.txt`, encoding as the Hugging Face slow tokenizers InternVL trains with
(transformers 4.x, `use_fast=False`).

InternLM2 (its remote-code InternLM2Tokenizer) and Phi-3 (LlamaTokenizer) ship sentencepiece
models, Qwen2 byte-level BPE files. Text is split first on the added tokens (tokenizer_config.json's
`added_tokens_decoder`, else added_tokens.json; InternVL adds nine after the base vocabulary) and
the named special tokens; one with `rstrip`/`lstrip` swallows the whitespace on that side (Phi-3's
`<|user|>` eats the newline after it). With `legacy: false` (Phi-3), LlamaTokenizer prefixes the
whole text with "▁" and encodes each piece without sentencepiece's dummy prefix, so text right
after a special token gets no "▁"; the leading "▁" is dropped only before a token of
`all_special_tokens` (the named special tokens and `additional_special_tokens`). Each token's
start character is reported so template code can mask by character ranges.
"""

from __future__ import annotations

import abc
import json
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypedDict

import numpy as np
from etils import epath

from mini_internvl_jax.data.errors import TokenizerError

IMG_START = "<img>"
IMG_END = "</img>"
IMG_CONTEXT = "<IMG_CONTEXT>"
# Added by InternVL training in this order (ids follow the base vocabulary).
INTERNVL_TOKENS = (IMG_START, IMG_END, IMG_CONTEXT, "<quad>", "</quad>", "<ref>", "</ref>",
                   "<box>", "</box>")
TEMPLATE_TOKENS = ("<|im_start|>", "<|im_end|>", "<|system|>", "<|user|>", "<|assistant|>",
                   "<|end|>", "<|endoftext|>")
SPIECE_UNDERLINE = "\u2581"
# tokenizer_config.json keys of transformers' named special tokens, all split on like added ones.
NAMED_SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token",
                      "cls_token", "mask_token")
# transformers' Qwen2Tokenizer pre-tokenizer regex.
QWEN2_PRETOKENIZE_REGEX = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
                           r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@dataclass(frozen=True)
class AddedToken:
    """A token matched in the raw text before the model sees it (transformers' AddedToken)."""

    id: int
    lstrip: bool = False   # swallows the whitespace before it
    rstrip: bool = False   # swallows the whitespace after it
    single_word: bool = False
    source: str = ""       # the file that declares it


def _token_text(value) -> str | None:
    """`tokenizer_config.json` stores tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


def _added_token(spec, tid: int, source: str) -> AddedToken:
    flags = spec if isinstance(spec, dict) else {}
    return AddedToken(tid, lstrip=bool(flags.get("lstrip")), rstrip=bool(flags.get("rstrip")),
                      single_word=bool(flags.get("single_word")), source=source)


def _read_json(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None


def read_added_tokens(folder: str | epath.PathLike) -> dict[str, AddedToken]:
    """The added tokens of a Hugging Face tokenizer folder, read as transformers reads them:
    tokenizer_config.json's `added_tokens_decoder` if it has one, else added_tokens.json
    overlaid (by id) with tokenizer.json's `added_tokens`."""
    folder = epath.Path(folder)
    cfg_file = folder / "tokenizer_config.json"
    cfg = _read_json(cfg_file) if cfg_file.exists() else {}
    by_id: dict[int, tuple[str, AddedToken]] = {}
    if "added_tokens_decoder" in cfg:
        for tid, spec in (cfg["added_tokens_decoder"] or {}).items():
            text = _token_text(spec)
            if text is None:
                raise TokenizerError(f"{cfg_file}: added_tokens_decoder[{tid!r}] has no "
                                     "content (expected a string or {\"content\": ...})")
            by_id[int(tid)] = (text, _added_token(spec, int(tid), cfg_file.name))
    else:
        f = folder / "added_tokens.json"
        if f.exists():
            for tok, tid in _read_json(f).items():
                by_id[int(tid)] = (tok, AddedToken(int(tid), source=f.name))
        f = folder / "tokenizer.json"
        if f.exists():
            for spec in _read_json(f).get("added_tokens") or []:
                by_id[int(spec["id"])] = (spec["content"],
                                          _added_token(spec, int(spec["id"]), f.name))
    return {tok: token for _, (tok, token) in sorted(by_id.items())}


def image_context_id(folder: str | epath.PathLike) -> tuple[int, str] | None:
    """(id, file) of `<IMG_CONTEXT>` as the folder's tokenizer files declare it, if they do."""
    token = read_added_tokens(folder).get(IMG_CONTEXT)
    return None if token is None else (token.id, token.source)


class Tokenizer(abc.ABC):
    """Common surface of both tokenizer kinds; see `load_tokenizer`."""

    kind: str
    path: str
    vocab_size: int
    add_bos: bool
    bos_id: int | None
    eos_id: int | None
    pad_id: int
    merges_compat: str | None = None  # see MERGES_COMPAT; BPE tokenizers only

    @abc.abstractmethod
    def find_token(self, token: str) -> int | None:
        """Id of `token` if it is a single entry of the vocabulary."""

    def encode_with_offsets(self, text: str, after: str | None = None
                            ) -> tuple[list[int], list[int]]:
        """Token ids of `text` (no BOS) and the character index each token starts at.

        `after` names the special token `text` directly follows in a longer prompt (`</img>`
        where image ids are spliced in by id): the ids are then those the whole prompt has
        there, not those of a prompt start (LlamaTokenizer's legacy=False "▁" prefix) and
        with `after`'s rstrip applied.
        """
        if after is None:
            return self._encode_with_offsets(text)
        tid = self.token_id(after)
        ids, starts = self._encode_with_offsets(after + text)
        k = ids.index(tid) + 1  # 1 or 2: legacy=False may keep its "▁" before `after`
        return ids[k:], [max(s - len(after), 0) for s in starts[k:]]

    @abc.abstractmethod
    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]: ...

    @abc.abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens recognised, no BOS."""

    @abc.abstractmethod
    def decode(self, ids: Iterable[int]) -> str:
        """Text of `ids`; ids the vocabulary lacks (a model's padded embedding rows) decode to
        nothing, as in the `tokenizers` library, rather than raising."""

    def token_id(self, token: str, needed_for: str = "") -> int:
        """Id of a special token, or a `TokenizerError` naming the token and the file."""
        tid = self.find_token(token)
        if tid is None:
            why = f" (needed for {needed_for})" if needed_for else ""
            raise TokenizerError(
                f"tokenizer {self.path or self.kind} has no single token {token!r}{why}; "
                "InternVL checkpoints add <img> </img> <IMG_CONTEXT> <quad> </quad> <ref> </ref> "
                "<box> </box> after the base vocabulary (added_tokens.json)")
        return tid

    def require(self, tokens: Sequence[str], needed_for: str) -> dict[str, int]:
        """Ids of all `tokens`; one error listing every missing token."""
        found = {t: self.find_token(t) for t in tokens}
        missing = [t for t, tid in found.items() if tid is None]
        if missing:
            raise TokenizerError(
                f"tokenizer {self.path or self.kind} lacks special token(s) {missing} needed for "
                f"{needed_for}; add them as special tokens (added_tokens.json) or pick the "
                "matching template")
        return {t: tid for t, tid in found.items() if tid is not None}

    def special_token_ids(self) -> dict[str, int]:
        """Every InternVL or template special token this vocabulary has."""
        out = {}
        for t in INTERNVL_TOKENS + TEMPLATE_TOKENS:
            tid = self.find_token(t)
            if tid is not None:
                out[t] = tid
        return out


def _without_dummy_prefix(model_proto: bytes) -> bytes:
    """The model with `add_dummy_prefix` off, as LlamaTokenizer(legacy=False) loads it."""
    from sentencepiece import sentencepiece_model_pb2

    # The generated protobuf module ships no stubs for its message classes.
    model = sentencepiece_model_pb2.ModelProto.FromString(model_proto)  # type: ignore[attr-defined]
    model.normalizer_spec.add_dummy_prefix = False
    return model.SerializeToString()


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece model plus added tokens (InternLM2, Phi-3); see the module docstring."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, *, path: str = "",
                 added_tokens: Mapping[str, AddedToken] | None = None, legacy: bool = True,
                 add_bos: bool | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 unk_token: str | None = None, extra_special_tokens: Sequence[str] = ()):
        import sentencepiece as spm

        self._args = dict(model_proto=model_proto, path=path, added_tokens=added_tokens,
                          legacy=legacy, add_bos=add_bos, bos_token=bos_token,
                          eos_token=eos_token, pad_token=pad_token, unk_token=unk_token,
                          extra_special_tokens=extra_special_tokens)
        self.path = path
        self.legacy = legacy
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos
            raise TokenizerError(f"{path or 'tokenizer.model'} is not a sentencepiece model: "
                                 f"{e}") from None
        self._enc = self._sp if legacy else spm.SentencePieceProcessor(
            model_proto=_without_dummy_prefix(model_proto))
        n = self._num_pieces = self._sp.get_piece_size()
        # Added tokens may also rename an existing piece (InternLM2 checkpoints map
        # <|im_start|> onto a piece stored as [UNUSED_TOKEN_146]); the added name wins.
        self._added = dict(added_tokens or {})
        for tok, spec in self._added.items():
            if spec.single_word:
                raise TokenizerError(f"{path}: added token {tok!r} sets single_word, which this "
                                     "tokenizer does not implement")
        self._id_to_added = {spec.id: tok for tok, spec in self._added.items()}
        self.vocab_size = max([n] + [spec.id + 1 for spec in self._added.values()])

        def piece(tid: int) -> str | None:
            return self._sp.id_to_piece(tid) if tid >= 0 else None

        bos_token = bos_token or piece(self._sp.bos_id())
        eos_token = eos_token or piece(self._sp.eos_id())
        self._unk = unk_token or piece(self._sp.unk_id()) or "<unk>"
        self._unk_len = len(self._enc.encode(self._unk))
        self.bos_id = self.find_token(bos_token) if bos_token else None
        self.eos_id = self.find_token(eos_token) if eos_token else None
        pad = self.find_token(pad_token) if pad_token else None
        self.pad_id = 0 if pad is None else pad
        self.add_bos = (self.bos_id is not None) if add_bos is None else bool(add_bos)
        if self.add_bos and self.bos_id is None:
            raise TokenizerError(f"{path}: add_bos_token is set but the model has no BOS token")

        # transformers' all_special_tokens; each one the vocabulary has is split on, like the
        # added tokens.
        self._all_special = frozenset(t for t in (bos_token, eos_token, self._unk, pad_token,
                                                  *extra_special_tokens) if t)
        self._split_tokens = dict(self._added)
        for tok in self._all_special:
            tid = self.find_token(tok)
            if tok not in self._split_tokens and tid is not None:
                self._split_tokens[tok] = AddedToken(tid)
        self._split = re.compile("|".join(
            re.escape(t) for t in sorted(self._split_tokens, key=len, reverse=True))
        ) if self._split_tokens else None

    def __getstate__(self):
        return self._args

    def __setstate__(self, state):
        self.__init__(**state)

    def find_token(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token].id
        tid = self._sp.piece_to_id(token)
        return tid if self._sp.id_to_piece(tid) == token else None

    def encode(self, text: str) -> list[int]:
        return self._encode(text, offsets=False)[0]

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        return self._encode(text, offsets=True)

    def _encode(self, text: str, offsets: bool) -> tuple[list[int], list[int]]:
        """transformers' PreTrainedTokenizer.tokenize plus LlamaTokenizer's legacy handling."""
        ids: list[int] = []
        starts: list[int] = []
        if not text:
            return ids, starts
        shift = 0
        if not self.legacy:
            text = SPIECE_UNDERLINE + text.replace(SPIECE_UNDERLINE, " ")
            shift = 1
        # [start, end, token]: text runs (token None) alternate with split tokens.
        parts: list[list] = []
        pos = 0
        for m in self._split.finditer(text) if self._split else ():
            parts += [[pos, m.start(), None], [m.start(), m.end(), m.group()]]
            pos = m.end()
        parts.append([pos, len(text), None])
        for k in range(1, len(parts), 2):
            spec = self._split_tokens[parts[k][2]]
            if spec.rstrip:
                right = parts[k + 1]
                run = text[right[0]:right[1]]
                right[0] += len(run) - len(run.lstrip())
            if spec.lstrip:
                left = parts[k - 1]
                run = text[left[0]:left[1]]
                left[1] -= len(run) - len(run.rstrip())
        first_special = None  # index in `ids` of the first split token
        for start, end, tok in parts:
            if tok is not None:
                first_special = len(ids) if first_special is None else first_special
                ids.append(self._split_tokens[tok].id)
                starts.append(start)
            elif end > start:
                self._encode_run(text[start:end], start, offsets, ids, starts)
        if (shift and first_special == 1 and self._sp.id_to_piece(ids[0]) == SPIECE_UNDERLINE
                and parts[1][2] in self._all_special):
            del ids[0], starts[0]
        if shift and offsets:
            starts = [max(s - shift, 0) for s in starts]
        return ids, starts

    def _encode_run(self, run: str, base: int, offsets: bool, ids: list[int],
                    starts: list[int]) -> None:
        skip = 0
        if not self.legacy and run.startswith((SPIECE_UNDERLINE, " ")):
            # Without the dummy prefix sentencepiece would drop this leading space: encode
            # "<unk>" + run and drop the pieces of "<unk>" (transformers' trick).
            run, skip = self._unk + run, self._unk_len
        if not offsets:
            ids.extend(self._enc.encode(run)[skip:])
            return
        cut = len(self._unk) if skip else 0
        pieces = self._enc.encode(run, return_type="proto").pieces[skip:]
        # sentencepiece reports UTF-8 byte offsets; map them to characters.
        byte_to_char = None if run.isascii() else np.repeat(
            np.arange(len(run)), [len(c.encode()) for c in run])
        for p in pieces:
            char = p.begin if byte_to_char is None else int(
                byte_to_char[min(p.begin, len(byte_to_char) - 1)])
            ids.append(p.id)
            starts.append(base + max(char - cut, 0))

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                text = self._sp.decode(run)
                # sentencepiece drops a leading "▁" as if it were the dummy prefix.
                if out and self._sp.id_to_piece(run[0]).startswith(SPIECE_UNDERLINE):
                    text = " " + text
                out.append(text)
                run.clear()

        for i in ids:
            i = int(i)
            if i in self._id_to_added:
                flush()
                out.append(self._id_to_added[i])
            elif 0 <= i < self._num_pieces:
                run.append(i)
        flush()
        return "".join(out)


# `merges_compat` values: None = current transformers (and every fast tokenizer); "4.37" =
# transformers 4.37's slow Qwen2Tokenizer, which read merges.txt skipping every line that starts
# with "#" as a comment, so real merges such as "# #" or "## #" were lost. InternVL2 was
# fine-tuned with that tokenizer (use_fast=False); "4.37" rebuilds its token stream exactly.
MERGES_COMPAT = (None, "4.37")


def _check_merges_compat(merges_compat: str | None, path) -> None:
    if merges_compat not in MERGES_COMPAT:
        raise TokenizerError(f"{path}: merges_compat {merges_compat!r} is not one of "
                             f"{list(MERGES_COMPAT)}")


def _hash_comment(first_token: str) -> bool:
    """True for a merge transformers 4.37's slow Qwen2Tokenizer took for a comment line."""
    return first_token.startswith("#")


def _bpe_tokenizer_json(vocab_file: epath.Path, merges_file: epath.Path,
                        merges_compat: str | None = None) -> str:
    """tokenizer.json text of Qwen2's slow tokenizer files: byte-level BPE over NFC text split
    by Qwen2's regex (transformers' Qwen2Tokenizer)."""
    from tokenizers import Regex, decoders, models, normalizers, pre_tokenizers
    from tokenizers import Tokenizer as _Tok

    vocab = _read_json(vocab_file)
    lines = merges_file.read_text().splitlines()
    if lines and lines[0].startswith("#version:"):
        lines = lines[1:]
    if merges_compat == "4.37":
        lines = [line for line in lines if not _hash_comment(line.strip())]
    merges = [tuple(line.split()) for line in lines if line.strip()]
    bad = [line for line in merges if len(line) != 2]
    if bad:
        raise TokenizerError(f"{merges_file}: merge {' '.join(bad[0])!r} is not two tokens")
    try:
        tok = _Tok(models.BPE(vocab, merges, unk_token=None, fuse_unk=False,
                              byte_fallback=False))
    except Exception as e:  # tokenizers raises a bare Exception for merges outside the vocab
        raise TokenizerError(f"{vocab_file} + {merges_file} do not form a BPE model: {e}"
                             ) from None
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    return tok.to_str()


def _drop_hash_merges(tokenizer_json: str, path) -> str:
    """A BPE tokenizer.json without the merges transformers 4.37's slow tokenizer skipped."""
    data = json.loads(tokenizer_json)
    model = data.get("model") or {}
    if model.get("type") != "BPE":
        raise TokenizerError(f"{path}: merges_compat needs a BPE model, this tokenizer.json has "
                             f"{model.get('type')!r}")
    model["merges"] = [m for m in model.get("merges") or []
                       if not _hash_comment(m if isinstance(m, str) else m[0])]
    return json.dumps(data)


class HFTokenizer(Tokenizer):
    """Hugging Face `tokenizers` model: a `tokenizer.json`, or Qwen2's vocab.json + merges.txt."""

    kind = "hf"

    def __init__(self, tokenizer_json: str, *, path: str = "",
                 added_tokens: Mapping[str, AddedToken] | None = None,
                 add_bos: bool | None = None, bos_token: str | None = None,
                 eos_token: str | None = None, pad_token: str | None = None,
                 merges_compat: str | None = None):
        from tokenizers import AddedToken as _AddedToken
        from tokenizers import Tokenizer as _Tok

        self._args = dict(tokenizer_json=tokenizer_json, path=path, added_tokens=added_tokens,
                          add_bos=add_bos, bos_token=bos_token, eos_token=eos_token,
                          pad_token=pad_token, merges_compat=merges_compat)
        self.path = path
        # Recorded only (the merges were filtered by the loader) so callers can check it.
        self.merges_compat = merges_compat
        try:
            self._tok = _Tok.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{path or 'tokenizer.json'} is not a tokenizers file: {e}"
                                 ) from None
        for tok, spec in sorted((added_tokens or {}).items(), key=lambda kv: kv[1].id):
            have = self._tok.token_to_id(tok)
            if have is None:
                self._tok.add_special_tokens([_AddedToken(
                    tok, special=True, normalized=False, lstrip=spec.lstrip, rstrip=spec.rstrip,
                    single_word=spec.single_word)])
                have = self._tok.token_to_id(tok)
            if have != spec.id:
                raise TokenizerError(f"{path}: added token {tok!r} should have id {spec.id} "
                                     f"({spec.source}) but the tokenizer gives it {have}")
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.find_token(bos_token) if bos_token else None
        self.eos_id = self.find_token(eos_token) if eos_token else None
        pad = self.find_token(pad_token) if pad_token else None
        self.pad_id = 0 if pad is None else pad
        self.add_bos = bool(add_bos) and self.bos_id is not None
        if add_bos and self.bos_id is None:
            raise TokenizerError(f"{path}: add_bos_token is set but bos_token is missing")

    def __getstate__(self):
        return self._args

    def __setstate__(self, state):
        self.__init__(**state)

    def find_token(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [o[0] for o in enc.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        known = [int(i) for i in ids if 0 <= int(i) < self.vocab_size]
        return self._tok.decode(known, skip_special_tokens=False)


class _TokenizerArgs(TypedDict):
    """Constructor arguments both tokenizer kinds take, as `load_tokenizer` reads them."""

    path: str
    added_tokens: dict[str, AddedToken]
    add_bos: bool | None
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None


def find_tokenizer(folder: str | epath.PathLike, kind: str | None = None) -> epath.Path | None:
    """The file `load_tokenizer` reads in `folder`, or None: tokenizer.model (sentencepiece),
    else tokenizer.json, else vocab.json when merges.txt is next to it (Qwen2's slow tokenizer).
    `kind` "sentencepiece" or "hf" (the other two) restricts the choice."""
    if kind not in (None, "sentencepiece", "hf"):
        raise TokenizerError(f"tokenizer kind {kind!r} is not 'sentencepiece' or 'hf'")
    folder = epath.Path(folder)
    names = (["tokenizer.model"] if kind != "hf" else []) + (
        ["tokenizer.json"] if kind != "sentencepiece" else [])
    for name in names:
        if (folder / name).is_file():
            return folder / name
    if kind != "sentencepiece" and (folder / "vocab.json").is_file() and (
            folder / "merges.txt").is_file():
        return folder / "vocab.json"
    return None


def load_tokenizer(path: str | epath.PathLike, kind: str | None = None, *,
                   merges_compat: str | None = None) -> Tokenizer:
    """Tokenizer from a folder (see `find_tokenizer`) or from one of its model files.

    `merges_compat="4.37"` reproduces transformers 4.37's slow Qwen2Tokenizer, which skipped
    every merge line starting with "#" (see MERGES_COMPAT); BPE tokenizers only.

    The folder may also hold `tokenizer_config.json` (add_bos_token, named special tokens,
    additional_special_tokens, added_tokens_decoder, legacy, tokenizer_class) and
    `added_tokens.json`, as Hugging Face checkpoints do. A folder with several model files uses
    `tokenizer.model` (InternVL trains with the slow sentencepiece tokenizer) unless `kind` is
    "hf".
    """
    p = epath.Path(path)
    _check_merges_compat(merges_compat, p)
    if not p.exists():
        raise TokenizerError(f"tokenizer path {p} does not exist")
    folder = p if p.is_dir() else p.parent
    model = find_tokenizer(p, kind) if p.is_dir() else p
    if model is None:
        half = " (vocab.json is there, merges.txt is not)" if (p / "vocab.json").exists() else ""
        raise TokenizerError(f"{p}: found neither tokenizer.model (sentencepiece) nor "
                             f"tokenizer.json nor vocab.json + merges.txt (Qwen2){half}")
    sentencepiece = model.name.endswith(".model")
    if kind is not None and sentencepiece != (kind == "sentencepiece"):
        raise TokenizerError(f"{model} is not a kind={kind!r} tokenizer file")

    cfg = {}
    if (folder / "tokenizer_config.json").exists():
        cfg = _read_json(folder / "tokenizer_config.json")
    named = {key: _token_text(cfg.get(key)) for key in NAMED_SPECIAL_KEYS}
    kwargs = _TokenizerArgs(path=str(p), added_tokens=read_added_tokens(folder),
                            add_bos=cfg.get("add_bos_token"), bos_token=named["bos_token"],
                            eos_token=named["eos_token"], pad_token=named["pad_token"])
    if not sentencepiece:
        if model.name == "vocab.json":
            if not (folder / "merges.txt").is_file():
                raise TokenizerError(f"{model} needs merges.txt next to it (Qwen2's BPE files)")
            return HFTokenizer(_bpe_tokenizer_json(model, folder / "merges.txt", merges_compat),
                               merges_compat=merges_compat, **kwargs)
        text = model.read_text()
        if merges_compat is not None:
            text = _drop_hash_merges(text, model)
        return HFTokenizer(text, merges_compat=merges_compat, **kwargs)
    if merges_compat is not None:
        raise TokenizerError(f"{model}: merges_compat applies to BPE merges (Qwen2); this is a "
                             "sentencepiece model")
    # transformers 5 saves additional_special_tokens as extra_special_tokens.
    listed = cfg.get("additional_special_tokens") or cfg.get("extra_special_tokens") or []
    extra = [named["sep_token"], named["cls_token"], named["mask_token"]] + [
        _token_text(t) for t in (listed if isinstance(listed, list) else [])]
    # InternLM2's remote-code tokenizer has no `legacy` switch: it always encodes like legacy.
    legacy = cfg.get("legacy") is not False or str(
        cfg.get("tokenizer_class", "")).startswith("InternLM2")
    return SentencePieceTokenizer(model.read_bytes(), legacy=legacy,
                                  unk_token=named["unk_token"],
                                  extra_special_tokens=[t for t in extra if t], **kwargs)
