"""Synthetic demo dataset (`mivl-demo-data OUT_DIR [--seed 0]` writes it).

Writes, deterministically and in a few seconds, everything the README demo needs:

    OUT_DIR/
      README.md                 this layout
      demo_manifest.json        counts, tokenizer files, <IMG_CONTEXT> ids
      stage1_meta.json          {"demo_captions": {...}}                       (alignment)
      stage2_meta.json          {"demo_qa": ..., "demo_multi_image": ..., "demo_text": ...}
      images/NNNN.{jpg,png}     shapes, colour swatches, 7-segment digits, bar charts,
                                64-300 px, assorted aspect ratios
      stage1/captions.jsonl     one image + caption prompt -> caption
      stage2/qa.jsonl           one image, 1-3 question/answer rounds
      stage2/multi_image.jsonl  two images ("Image-1: <image>\\nImage-2: <image>\\n...")
      stage2/text_only.jsonl    arithmetic chat without images
      mpo_meta.json / mpo/pairs.jsonl   preference pairs (MPO): a stage-2 question, its
                                answer (chosen) and another image's answer (rejected)
      tokenizers/qwen2/         tokenizer.json + tokenizer_config.json   (Hermes-2)
      tokenizers/internlm2/     tokenizer.model + tokenizer_config.json  (internlm2-chat)
      tokenizers/phi3/          tokenizer.model + tokenizer_config.json  (phi3-chat)

Each tokenizer has vocab <= 512 and the InternVL special tokens, with <img>=3, </img>=4
and <IMG_CONTEXT>=5 in all three (the tiny model presets use image_token_id 5).
The whole folder is built under a temporary name and renamed into place.
"""

from __future__ import annotations

import io
import json
import os
import textwrap
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from mini_internvl_jax.data.templates import DEFAULT_SYSTEM_MESSAGE, TEMPLATES
from mini_internvl_jax.data.tokenizer import INTERNVL_TOKENS
from mini_internvl_jax.fileio import atomic_folder

VOCAB_SIZE = 512
MANIFEST = "demo_manifest.json"
COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220),
           "yellow": (235, 200, 40), "purple": (140, 60, 180), "orange": (240, 140, 30)}
BACKGROUNDS = {"white": (250, 250, 250), "grey": (150, 150, 150), "black": (15, 15, 15)}
SHAPES = ("circle", "square", "triangle")
# 7-segment layout: segments a..g lit per digit.
SEGMENTS = {0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg", 5: "acdfg", 6: "acdefg",
            7: "abc", 8: "abcdefg", 9: "abcdfg"}
CAPTION_PROMPTS = ("Describe the image briefly.", "What is in this picture?",
                   "Write a short caption for the image.")
ORDINAL = ("first", "second", "third", "fourth", "fifth")


def _size(rng) -> tuple[int, int]:
    ratio = rng.choice([1.0, 4 / 3, 3 / 4, 16 / 9, 9 / 16, 2.0, 0.5, 3.0])
    long_side = int(rng.integers(64, 301))
    if ratio >= 1:
        return long_side, max(64, int(long_side / ratio))
    return max(64, int(long_side * ratio)), long_side


def _draw_shape(d: ImageDraw.ImageDraw, shape: str, box, colour) -> None:
    x0, y0, x1, y1 = box
    if shape == "circle":
        d.ellipse(box, fill=colour)
    elif shape == "square":
        d.rectangle(box, fill=colour)
    else:
        d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=colour)


def _shapes_image(rng):
    w, h = _size(rng)
    bg = str(rng.choice(list(BACKGROUNDS)))
    n = int(rng.integers(1, 4))
    shapes = [str(s) for s in rng.choice(SHAPES, size=n, replace=False)]
    colours = [str(c) for c in rng.choice(list(COLOURS), size=n, replace=False)]
    im = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    d = ImageDraw.Draw(im)
    cell = w / n
    for k, (s, c) in enumerate(zip(shapes, colours, strict=True)):
        side = min(cell, h) * 0.7
        cx, cy = cell * (k + 0.5), h / 2
        _draw_shape(d, s, (cx - side / 2, cy - side / 2, cx + side / 2, cy + side / 2),
                    COLOURS[c])
    return im, dict(kind="shapes", bg=bg, shapes=shapes, colours=colours)


def _digit_image(rng):
    w, h = _size(rng)
    digit = int(rng.integers(0, 10))
    bg = str(rng.choice(list(BACKGROUNDS)))
    colour = str(rng.choice(list(COLOURS)))
    im = Image.new("RGB", (w, h), BACKGROUNDS[bg])
    d = ImageDraw.Draw(im)
    dh = h * 0.8
    dw, t = dh / 2, max(2, dh / 10)
    x0, y0 = (w - dw) / 2, (h - dh) / 2
    segs = {"a": (x0, y0, x0 + dw, y0 + t), "g": (x0, y0 + dh / 2 - t / 2, x0 + dw,
                                                  y0 + dh / 2 + t / 2),
            "d": (x0, y0 + dh - t, x0 + dw, y0 + dh), "f": (x0, y0, x0 + t, y0 + dh / 2),
            "b": (x0 + dw - t, y0, x0 + dw, y0 + dh / 2),
            "e": (x0, y0 + dh / 2, x0 + t, y0 + dh), "c": (x0 + dw - t, y0 + dh / 2, x0 + dw,
                                                           y0 + dh)}
    for s in SEGMENTS[digit]:
        d.rectangle(segs[s], fill=COLOURS[colour])
    return im, dict(kind="digit", bg=bg, digit=digit, colour=colour)


def _chart_image(rng):
    w, h = _size(rng)
    n = int(rng.integers(2, 6))
    heights = rng.permutation(np.arange(1, 10))[:n].tolist()
    colour = str(rng.choice(list(COLOURS)))
    im = Image.new("RGB", (w, h), BACKGROUNDS["white"])
    d = ImageDraw.Draw(im)
    d.line([(4, h - 4), (w - 4, h - 4)], fill=(0, 0, 0), width=2)
    bw = (w - 8) / n
    for k, v in enumerate(heights):
        top = h - 4 - (h - 12) * v / 9
        d.rectangle((4 + bw * k + bw * 0.15, top, 4 + bw * (k + 1) - bw * 0.15, h - 5),
                    fill=COLOURS[colour])
    return im, dict(kind="chart", heights=heights, colour=colour)


def _swatch_image(rng):
    w, h = _size(rng)
    colour = str(rng.choice(list(COLOURS)))
    base = np.asarray(COLOURS[colour], dtype=np.float32)
    shade = np.linspace(0.75, 1.0, w, dtype=np.float32)[None, :, None]
    arr = np.clip(base * shade * np.ones((h, 1, 1), np.float32), 0, 255).astype(np.uint8)
    return Image.fromarray(arr), dict(kind="swatch", colour=colour)


_MAKERS = (_shapes_image, _digit_image, _chart_image, _swatch_image)


def _caption(info) -> str:
    k = info["kind"]
    if k == "shapes":
        things = [f"a {c} {s}" for s, c in zip(info["shapes"], info["colours"], strict=True)]
        listed = things[0] if len(things) == 1 else ", ".join(things[:-1]) + " and " + things[-1]
        return f"{listed[0].upper()}{listed[1:]} on a {info['bg']} background."
    if k == "digit":
        return f"The digit {info['digit']} drawn in {info['colour']} on a {info['bg']} background."
    if k == "chart":
        top = ORDINAL[int(np.argmax(info["heights"]))]
        return (f"A bar chart with {len(info['heights'])} {info['colour']} bars; the {top} "
                "bar is the tallest.")
    return f"A {info['colour']} colour swatch that gets lighter to the right."


def _questions(info, rng) -> list[tuple[str, str]]:
    k = info["kind"]
    if k == "shapes":
        qa = [("How many shapes are in the image?", f"There are {len(info['shapes'])}."),
              ("What is the background colour?", f"The background is {info['bg']}.")]
        for s, c in zip(info["shapes"], info["colours"], strict=True):
            qa.append((f"What colour is the {s}?", f"The {s} is {c}."))
            qa.append((f"Which shape is {c}?", f"The {c} shape is a {s}."))
    elif k == "digit":
        d = info["digit"]
        qa = [("What digit is shown?", f"The digit is {d}."),
              ("Is the digit even or odd?", f"It is {'even' if d % 2 == 0 else 'odd'}."),
              ("What colour is the digit?", f"The digit is {info['colour']}.")]
    elif k == "chart":
        hs = info["heights"]
        qa = [("How many bars does the chart have?", f"The chart has {len(hs)} bars."),
              ("Which bar is the tallest?", f"The {ORDINAL[int(np.argmax(hs))]} bar."),
              ("Is the first bar taller than the second bar?",
               "Yes, it is." if hs[0] > hs[1] else "No, it is shorter."),
              ("What colour are the bars?", f"The bars are {info['colour']}.")]
    else:
        qa = [("What colour is this?", f"It is {info['colour']}."),
              ("Is the image one solid shade?", "No, it gets lighter from left to right.")]
    order = rng.permutation(len(qa))
    return [qa[i] for i in order]


def _conversation(first_prefix: str, qa: list[tuple[str, str]]) -> list[dict]:
    conv = []
    for k, (q, a) in enumerate(qa):
        conv.append({"from": "human", "value": (first_prefix + q) if k == 0 else q})
        conv.append({"from": "gpt", "value": a})
    return conv


def _write_image(im: Image.Image, folder: Path, idx: int, rng) -> str:
    fmt = "png" if rng.random() < 0.2 else "jpg"
    name = f"{idx:04d}.{fmt}"
    buf = io.BytesIO()
    im.save(buf, format="PNG" if fmt == "png" else "JPEG", quality=90)
    (folder / name).write_bytes(buf.getvalue())
    return name


def _write_jsonl(path: Path, items: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(x, ensure_ascii=False) + "\n" for x in items))


def _train_sentencepiece(texts: list[str], user_symbols: list[str]) -> bytes:
    import sentencepiece as spm

    buf = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(texts), model_writer=buf, vocab_size=VOCAB_SIZE,
        model_type="bpe", character_coverage=1.0, byte_fallback=True,
        user_defined_symbols=user_symbols, unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        add_dummy_prefix=False, remove_extra_whitespaces=False,
        normalization_rule_name="identity", hard_vocab_limit=False, num_threads=1,
        max_sentence_length=16384, minloglevel=2)
    return buf.getvalue()


def train_bpe(texts: list[str], specials: list[str]) -> str:
    """A byte-level BPE tokenizer (Qwen2's pre-tokenizer) trained on `texts`, as tokenizer.json
    text; the demo's qwen2 tokenizer and the tokenizer tests use it."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # Qwen2's pre-tokenizer: a regex split, then byte-level without its own regex.
    pattern = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}|"
               r" ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(
        vocab_size=VOCAB_SIZE, special_tokens=specials, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return tok.to_str()


def _write_tokenizers(root: Path, texts: list[str]) -> dict:
    """Three tokenizers with <img>, </img>, <IMG_CONTEXT> at ids 3, 4, 5."""
    corpus = texts + [DEFAULT_SYSTEM_MESSAGE, "system\nuser\nassistant\n"] * 4
    out = {}
    qwen = root / "qwen2"
    qwen.mkdir(parents=True)
    qwen_specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *INTERNVL_TOKENS]
    (qwen / "tokenizer.json").write_text(train_bpe(corpus, qwen_specials))
    (qwen / "tokenizer_config.json").write_text(json.dumps(
        {"add_bos_token": False, "bos_token": None, "eos_token": "<|im_end|>",
         "pad_token": "<|endoftext|>"}, indent=1))
    out["qwen2"] = dict(path="tokenizers/qwen2", template="Hermes-2")
    for family, template, cfg in (
            ("internlm2", "internlm2-chat",
             {"add_bos_token": True, "bos_token": "<s>", "eos_token": "</s>",
              "pad_token": "</s>"}),
            ("phi3", "phi3-chat",
             {"add_bos_token": True, "bos_token": "<s>", "eos_token": "<|endoftext|>",
              "pad_token": "<|endoftext|>"})):
        folder = root / family
        folder.mkdir(parents=True)
        tmpl_tokens = [t for t in TEMPLATES[template].special_tokens]
        if family == "phi3":
            tmpl_tokens.append("<|endoftext|>")
        (folder / "tokenizer.model").write_bytes(
            _train_sentencepiece(corpus, [*INTERNVL_TOKENS, *tmpl_tokens]))
        (folder / "tokenizer_config.json").write_text(json.dumps(cfg, indent=1))
        out[family] = dict(path=f"tokenizers/{family}", template=template)
    return out


def _readme() -> str:
    doc = __doc__ or ""
    layout = textwrap.dedent(doc[doc.index("    OUT_DIR/"):doc.index("Each tokenizer")])
    note = doc[doc.index("Each tokenizer"):doc.index("The whole folder")]
    return ("# Demo data (generated)\n\nMade by `mivl-demo-data OUT_DIR`."
            "\n\n```\n" + layout.strip() + "\n```\n\n" + note.strip() + "\n")


def preference_pairs(qa: list[dict], seed: int) -> list[dict]:
    """MPO rows from single-image QA: the first question, its answer as `chosen` and a
    different answer taken from another sample as `rejected` (own stream: the other files do
    not change)."""
    rng = np.random.default_rng([seed, 7])
    pairs: list[dict] = []
    for k, item in enumerate(qa):
        q, a = (t["value"] for t in item["conversations"][:2])
        other = qa[(k + 1 + int(rng.integers(max(len(qa) - 1, 1)))) % len(qa)]
        b = other["conversations"][1]["value"]
        if b != a:
            pairs.append({"id": len(pairs), "image": item["image"], "question": q,
                          "chosen": a, "rejected": b})
    return pairs


def _write_sets(root: Path, seed: int, captions: list[dict], qa: list[dict], multi: list[dict],
                text: list[dict]) -> list[dict]:
    """The JSONL files and the stage-1, stage-2 and MPO meta files; returns the MPO pairs."""
    _write_jsonl(root / "stage1" / "captions.jsonl", captions)
    _write_jsonl(root / "stage2" / "qa.jsonl", qa)
    _write_jsonl(root / "stage2" / "multi_image.jsonl", multi)
    _write_jsonl(root / "stage2" / "text_only.jsonl", text)

    def entry(annotation, n):
        return {"root": "images", "annotation": annotation, "data_augment": False,
                "repeat_time": 1, "length": n}

    (root / "stage1_meta.json").write_text(json.dumps(
        {"demo_captions": entry("stage1/captions.jsonl", len(captions))}, indent=1))
    (root / "stage2_meta.json").write_text(json.dumps(
        {"demo_qa": entry("stage2/qa.jsonl", len(qa)),
         "demo_multi_image": entry("stage2/multi_image.jsonl", len(multi)),
         "demo_text": entry("stage2/text_only.jsonl", len(text))}, indent=1))

    pairs = preference_pairs(qa, seed)
    _write_jsonl(root / "mpo" / "pairs.jsonl", pairs)
    (root / "mpo_meta.json").write_text(json.dumps(
        {"demo_pairs": entry("mpo/pairs.jsonl", len(pairs))}, indent=1))
    return pairs


def _build(root: Path, seed: int, num_stage1: int, num_stage2: int) -> dict:
    rng = np.random.default_rng(seed)
    images = root / "images"
    images.mkdir()
    idx = 0

    def new_image():
        nonlocal idx
        im, info = _MAKERS[int(rng.integers(len(_MAKERS)))](rng)
        name = _write_image(im, images, idx, rng)
        idx += 1
        return name, info

    captions: list[dict] = []
    for _ in range(num_stage1):
        name, info = new_image()
        prompt = str(rng.choice(CAPTION_PROMPTS))
        captions.append({"id": len(captions), "image": name, "conversations": [
            {"from": "human", "value": f"<image>\n{prompt}"},
            {"from": "gpt", "value": _caption(info)}]})
    qa: list[dict] = []
    multi: list[dict] = []
    text: list[dict] = []
    for k in range(num_stage2):
        kind = k % 4
        if kind in (0, 1):
            name, info = new_image()
            rounds = _questions(info, rng)[:int(rng.integers(1, 4))]
            # Every other sample leaves the placeholder out; the pipeline inserts it.
            prefix = "<image>\n" if len(qa) % 2 == 0 else ""
            qa.append({"id": len(qa), "image": name, "conversations": _conversation(prefix,
                                                                                    rounds)})
        elif kind == 2:
            (n1, i1), (n2, i2) = new_image(), new_image()
            q = "Which image shows more colour? Answer with Image-1 or Image-2."
            a = "Image-1." if i1["kind"] in ("swatch", "shapes") else "Image-2."
            if i1["kind"] == "digit" and i2["kind"] == "digit":
                q = "What is the sum of the two digits?"
                a = f"{i1['digit']} plus {i2['digit']} is {i1['digit'] + i2['digit']}."
            multi.append({"id": len(multi), "image": [n1, n2], "conversations": [
                {"from": "human", "value": f"Image-1: <image>\nImage-2: <image>\n{q}"},
                {"from": "gpt", "value": a},
                {"from": "human", "value": "Describe Image-1."},
                {"from": "gpt", "value": _caption(i1)}]})
        else:
            rounds = []
            for _ in range(int(rng.integers(1, 4))):
                x, y = (int(v) for v in rng.integers(0, 50, size=2))
                rounds.append((f"What is {x} plus {y}?", f"{x} plus {y} is {x + y}."))
            text.append({"id": len(text), "conversations": _conversation("", rounds)})

    pairs = _write_sets(root, seed, captions, qa, multi, text)
    texts = [t["value"] for item in captions + qa + multi + text for t in item["conversations"]]
    toks = _write_tokenizers(root / "tokenizers", texts)
    manifest = {"seed": seed, "images": idx,
                "stage1": {"meta": "stage1_meta.json", "samples": len(captions)},
                "stage2": {"meta": "stage2_meta.json", "samples": len(qa) + len(multi)
                           + len(text)},
                "mpo": {"meta": "mpo_meta.json", "pairs": len(pairs)},
                "tokenizers": toks, "image_token_ids": {"<img>": 3, "</img>": 4,
                                                        "<IMG_CONTEXT>": 5}}
    (root / MANIFEST).write_text(json.dumps(manifest, indent=1))
    (root / "README.md").write_text(_readme())
    return manifest


def write_demo(out_dir: str | os.PathLike, *, seed: int = 0, num_stage1: int = 160,
               num_stage2: int = 160, force: bool = False) -> dict:
    """Builds the demo folder under a temporary name, then renames it to `out_dir`.

    An existing non-empty `out_dir` is replaced only with `force=True` and only if it is
    an earlier demo folder (it has demo_manifest.json).
    """
    out = Path(out_dir).resolve()
    if out.exists() and any(out.iterdir()):
        if not force:
            raise FileExistsError(f"{out} exists and is not empty; pass --force to replace "
                                  "an earlier demo folder")
        if not (out / MANIFEST).exists():
            raise FileExistsError(f"{out} is not a demo folder (no {MANIFEST}); not replacing")
    with atomic_folder(out, overwrite=True) as tmp:
        return _build(tmp, seed, num_stage1, num_stage2)

