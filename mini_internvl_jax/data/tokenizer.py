"""One tokenizer interface over sentencepiece `tokenizer.model` and Hugging Face `tokenizer.json`.

InternLM2 and Phi-3 ship sentencepiece models, Qwen2 a `tokenizer.json`; InternVL adds nine
special tokens after the base vocabulary (`added_tokens.json` or `tokenizer_config.json`'s
`added_tokens_decoder`). Both wrappers split text on special tokens first and encode the
pieces between them, which is what Hugging Face tokenizers do with added tokens, and report
each token's start character so template code can mask by character ranges.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence

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


def _token_text(value) -> str | None:
    """`tokenizer_config.json` stores tokens as strings or as {"content": ...} dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class Tokenizer:
    """Common surface of both tokenizer kinds; see `load_tokenizer`."""

    kind: str
    path: str
    vocab_size: int
    add_bos: bool
    bos_id: int | None
    eos_id: int | None
    pad_id: int

    def find_token(self, token: str) -> int | None:
        """Id of `token` if it is a single entry of the vocabulary."""
        raise NotImplementedError

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        """Token ids of `text` (no BOS) and the character index each token starts at."""
        raise NotImplementedError

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens recognised, no BOS."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int]) -> str:
        raise NotImplementedError

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
        missing = [t for t in tokens if self.find_token(t) is None]
        if missing:
            raise TokenizerError(
                f"tokenizer {self.path or self.kind} lacks special token(s) {missing} needed for "
                f"{needed_for}; add them as special tokens (added_tokens.json) or pick the "
                "matching template")
        return {t: self.find_token(t) for t in tokens}

    def special_token_ids(self) -> dict[str, int]:
        """Every InternVL or template special token this vocabulary has."""
        out = {}
        for t in INTERNVL_TOKENS + TEMPLATE_TOKENS:
            tid = self.find_token(t)
            if tid is not None:
                out[t] = tid
        return out


class SentencePieceTokenizer(Tokenizer):
    """sentencepiece model plus added tokens (InternLM2, Phi-3)."""

    kind = "sentencepiece"

    def __init__(self, model_proto: bytes, *, path: str = "",
                 added_tokens: dict[str, int] | None = None, add_bos: bool | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        import sentencepiece as spm

        self._args = dict(model_proto=model_proto, path=path, added_tokens=added_tokens,
                          add_bos=add_bos, bos_token=bos_token, eos_token=eos_token,
                          pad_token=pad_token)
        self.path = path
        try:
            self._sp = spm.SentencePieceProcessor(model_proto=model_proto)
        except Exception as e:  # sentencepiece raises RuntimeError/OSError on bad protos
            raise TokenizerError(f"{path or 'tokenizer.model'} is not a sentencepiece model: "
                                 f"{e}") from None
        n = self._sp.get_piece_size()
        # Added tokens may also rename an existing piece (InternLM2 checkpoints map
        # <|im_start|> onto a piece stored as [UNUSED_TOKEN_146]); the added name wins.
        self._added = dict(added_tokens or {})
        self._id_to_added = {v: k for k, v in self._added.items()}
        self.vocab_size = max([n] + [v + 1 for v in self._added.values()])

        def piece_id(tok):
            return None if tok is None else self.find_token(tok)

        self.bos_id = piece_id(bos_token) if bos_token else _nonneg(self._sp.bos_id())
        self.eos_id = piece_id(eos_token) if eos_token else _nonneg(self._sp.eos_id())
        pad = piece_id(pad_token) if pad_token else _nonneg(self._sp.pad_id())
        self.pad_id = 0 if pad is None else pad
        self.add_bos = (self.bos_id is not None) if add_bos is None else bool(add_bos)
        if self.add_bos and self.bos_id is None:
            raise TokenizerError(f"{path}: add_bos_token is set but the model has no BOS token")

        # Split on every special string Hugging Face would treat as an added token.
        specials = dict(self._added)
        for tok in INTERNVL_TOKENS + TEMPLATE_TOKENS:
            tid = self.find_token(tok)
            if tid is not None:
                specials.setdefault(tok, tid)
        for tid in (self.bos_id, self.eos_id, _nonneg(self._sp.unk_id())):
            if tid is not None and tid < n:
                specials.setdefault(self._sp.id_to_piece(tid), tid)
        self._specials = specials
        self._split = re.compile("|".join(re.escape(t) for t in
                                          sorted(specials, key=len, reverse=True)))

    def __getstate__(self):
        return self._args

    def __setstate__(self, state):
        self.__init__(**state)

    def find_token(self, token: str) -> int | None:
        if token in self._added:
            return self._added[token]
        tid = self._sp.piece_to_id(token)
        return tid if self._sp.id_to_piece(tid) == token else None

    def encode(self, text: str) -> list[int]:
        ids: list[int] = []
        pos = 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                ids.extend(self._sp.encode(text[pos:m.start()]))
            ids.append(self._specials[m.group()])
            pos = m.end()
        if pos < len(text):
            ids.extend(self._sp.encode(text[pos:]))
        return ids

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        ids: list[int] = []
        starts: list[int] = []
        pos = 0
        for m in self._split.finditer(text):
            if m.start() > pos:
                self._encode_chunk(text[pos:m.start()], pos, ids, starts)
            ids.append(self._specials[m.group()])
            starts.append(m.start())
            pos = m.end()
        if pos < len(text):
            self._encode_chunk(text[pos:], pos, ids, starts)
        return ids, starts

    def _encode_chunk(self, chunk: str, base: int, ids: list[int], starts: list[int]) -> None:
        proto = self._sp.encode(chunk, return_type="proto")
        if chunk.isascii():
            for p in proto.pieces:
                ids.append(p.id)
                starts.append(base + p.begin)
            return
        # sentencepiece reports UTF-8 byte offsets; map them to characters.
        byte_to_char = np.repeat(np.arange(len(chunk)), [len(c.encode()) for c in chunk])
        for p in proto.pieces:
            ids.append(p.id)
            starts.append(base + int(byte_to_char[min(p.begin, len(byte_to_char) - 1)]))

    def decode(self, ids: Iterable[int]) -> str:
        out: list[str] = []
        run: list[int] = []

        def flush():
            if run:
                text = self._sp.decode(run)
                # sentencepiece drops a leading "▁" as if it were the dummy prefix.
                if out and self._sp.id_to_piece(run[0]).startswith("\u2581"):
                    text = " " + text
                out.append(text)
                run.clear()

        for i in ids:
            i = int(i)
            if i in self._id_to_added:
                flush()
                out.append(self._id_to_added[i])
            else:
                run.append(i)
        flush()
        return "".join(out)


class HFTokenizer(Tokenizer):
    """Hugging Face `tokenizers` model from a `tokenizer.json` (Qwen2)."""

    kind = "hf"

    def __init__(self, tokenizer_json: str, *, path: str = "",
                 added_tokens: dict[str, int] | None = None, add_bos: bool | None = None,
                 bos_token: str | None = None, eos_token: str | None = None,
                 pad_token: str | None = None):
        from tokenizers import AddedToken
        from tokenizers import Tokenizer as _Tok

        self._args = dict(tokenizer_json=tokenizer_json, path=path, added_tokens=added_tokens,
                          add_bos=add_bos, bos_token=bos_token, eos_token=eos_token,
                          pad_token=pad_token)
        self.path = path
        try:
            self._tok = _Tok.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception on parse errors
            raise TokenizerError(f"{path or 'tokenizer.json'} is not a tokenizers file: {e}"
                                 ) from None
        for tok, tid in sorted((added_tokens or {}).items(), key=lambda kv: kv[1]):
            have = self._tok.token_to_id(tok)
            if have is None:
                self._tok.add_special_tokens([AddedToken(tok, special=True, normalized=False)])
                have = self._tok.token_to_id(tok)
            if have != tid:
                raise TokenizerError(f"{path}: added token {tok!r} should have id {tid} but the "
                                     f"tokenizer gives it {have}")
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

    def encode_with_offsets(self, text: str) -> tuple[list[int], list[int]]:
        enc = self._tok.encode(text, add_special_tokens=False)
        return enc.ids, [o[0] for o in enc.offsets]

    def decode(self, ids: Iterable[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)


def _nonneg(i: int) -> int | None:
    return i if i >= 0 else None


def _read_json(path: epath.Path) -> dict:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise TokenizerError(f"{path} is not valid JSON: {e}") from None


def load_tokenizer(path: str | epath.PathLike, kind: str | None = None) -> Tokenizer:
    """Tokenizer from a folder (or its `tokenizer.model` / `tokenizer.json` file).

    The folder may also hold `tokenizer_config.json` (add_bos_token, bos/eos/pad tokens,
    added_tokens_decoder) and `added_tokens.json`, as Hugging Face checkpoints do.
    A folder with both model files uses `tokenizer.model` (InternVL trains with the slow
    sentencepiece tokenizer) unless `kind` is "hf".
    """
    p = epath.Path(path)
    if not p.exists():
        raise TokenizerError(f"tokenizer path {p} does not exist")
    folder = p if p.is_dir() else p.parent
    sp_file, hf_file = folder / "tokenizer.model", folder / "tokenizer.json"
    if not p.is_dir():
        sp_file = p if p.name.endswith(".model") else folder / "__none__"
        hf_file = p if p.name.endswith(".json") else folder / "__none__"
    if kind not in (None, "sentencepiece", "hf"):
        raise TokenizerError(f"tokenizer kind {kind!r} is not 'sentencepiece' or 'hf'")
    if kind == "sentencepiece" or (kind is None and sp_file.exists()):
        chosen = "sentencepiece"
    elif hf_file.exists():
        chosen = "hf"
    else:
        raise TokenizerError(f"{p}: found neither tokenizer.model (sentencepiece) nor "
                             "tokenizer.json (Hugging Face tokenizers)")
    if chosen == "sentencepiece" and not sp_file.exists():
        raise TokenizerError(f"{p}: no tokenizer.model for kind='sentencepiece'")

    cfg = {}
    if (folder / "tokenizer_config.json").exists():
        cfg = _read_json(folder / "tokenizer_config.json")
    added: dict[str, int] = {}
    for tid, spec in (cfg.get("added_tokens_decoder") or {}).items():
        added[_token_text(spec)] = int(tid)
    if (folder / "added_tokens.json").exists():
        added.update({k: int(v) for k, v in _read_json(folder / "added_tokens.json").items()})
    kwargs = dict(path=str(p), added_tokens=added, add_bos=cfg.get("add_bos_token"),
                  bos_token=_token_text(cfg.get("bos_token")),
                  eos_token=_token_text(cfg.get("eos_token")),
                  pad_token=_token_text(cfg.get("pad_token")))
    if chosen == "sentencepiece":
        return SentencePieceTokenizer(sp_file.read_bytes(), **kwargs)
    return HFTokenizer(hf_file.read_text(), **kwargs)
