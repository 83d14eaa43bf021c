"""The native export is a folder transformers serves: its tokenizer, image processor, chat
template and processor settings turn an image + question into exactly our prompt ids and tiles,
and `AutoModelForImageTextToText` generates greedily what we generate, per InternVL2 family.

transformers' `AutoProcessor` for InternVL also builds its video processor, which needs
torchvision (not installed here); the test goes through the processor's documented steps with
the folder's own files instead: `AutoImageProcessor`, `AutoTokenizer`, `chat_template.jinja`,
`<image>` -> `<img>` + `<IMG_CONTEXT>` x image_seq_length x tiles + `</img>` (what
`InternVLProcessor.replace_image_token` does) with `image_seq_length` from
`processor_config.json`. The original-layout export keeps the ids in `llm_config` and
generation_config.json."""

import json

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor, AutoModelForImageTextToText, AutoTokenizer

from mini_internvl_jax.checkpoints.resolve import open_source
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.data.processing import prepare_chat_inputs
from mini_internvl_jax.data.tokenizer import load_tokenizer
from mini_internvl_jax.infer.generate import GenerationConfig, Generator
from mini_internvl_jax.infer.runtime import Runtime
from tests.helpers.eval_assets import write_checkpoint

QUESTION = "What is in the image?"


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return tmp_path_factory.mktemp("serve")


def _transformers_inputs(out, img, question=QUESTION, history=()):
    """input_ids and pixel values from the exported folder's files, as InternVLProcessor."""
    tok = AutoTokenizer.from_pretrained(out)
    pixels = AutoImageProcessor.from_pretrained(out)(images=[img], return_tensors="pt")
    seq = json.loads((out / "processor_config.json").read_text())["image_seq_length"]
    msgs = [m for q, a in history for m in ({"role": "user", "content": q},
                                            {"role": "assistant", "content": a})]
    msgs.append({"role": "user", "content": [{"type": "image"},
                                             {"type": "text", "text": question}]})
    text = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False,
                                   chat_template=(out / "chat_template.jinja").read_text())
    tiles = int(pixels["num_patches"][0])
    text = text.replace("<image>", "<img>" + "<IMG_CONTEXT>" * seq * tiles + "</img>")
    return tok([text], return_tensors="pt"), pixels["pixel_values"]


IMG = Image.fromarray(np.random.RandomState(0).randint(0, 255, (60, 100, 3), np.uint8))


@pytest.mark.parametrize("family", ["internlm2", "phi3"])
def test_sentencepiece_exports_prompt_like_ours(family, root):
    """The sentencepiece families' tokenizers are remote code upstream; the export names a
    built-in class that must encode the whole chat prompt (with history) as ours does."""
    ckpt = write_checkpoint(root, family)
    out = root / f"native-sp-{family}"
    export_to_hf(ckpt, out, layout="native")
    cfg = open_source(ckpt).model_config
    history = [("Hi there", "Hello! How can I help?")]
    ours = prepare_chat_inputs([IMG], "What is   in the image ?", history,
                               tokenizer=load_tokenizer(ckpt), template=cfg.template,
                               image_size=cfg.vision.image_size,
                               num_image_tokens=cfg.num_image_tokens)
    enc, px = _transformers_inputs(out, IMG, "What is   in the image ?", history)
    assert enc["input_ids"][0].tolist() == list(np.asarray(ours.input_ids))
    np.testing.assert_allclose(px.numpy(), ours.pixel_values, atol=1e-6)


@pytest.mark.parametrize("family", ["qwen2", pytest.param("internlm2", marks=pytest.mark.slow),
                                    pytest.param("phi3", marks=pytest.mark.slow)])
def test_native_export_serves_in_transformers_like_ours(family, root):
    ckpt = root / ("ckpt" if family == "qwen2" else f"ckpt-{family}")
    if not ckpt.exists():
        write_checkpoint(root, family)
    out = root / f"native-{family}"
    export_to_hf(ckpt, out, layout="native", overwrite=True)
    files = {p.name for p in out.iterdir()}
    assert {"preprocessor_config.json", "processor_config.json", "chat_template.jinja",
            "generation_config.json", "tokenizer_config.json"} <= files

    src = open_source(ckpt)
    ours_tok = load_tokenizer(ckpt)
    rt = Runtime(Generator(src.load()), ours_tok, src.template, max_num=12)
    prompt, stops = rt.prompt([IMG], QUESTION)
    enc, px = _transformers_inputs(out, IMG)
    assert enc["input_ids"][0].tolist() == list(np.asarray(prompt.input_ids))
    np.testing.assert_allclose(px.numpy(), prompt.pixel_values, atol=1e-6)

    gen_cfg = json.loads((out / "generation_config.json").read_text())
    cfg = json.loads((out / "config.json").read_text())["text_config"]
    assert gen_cfg["eos_token_id"][0] == stops[0] == cfg["eos_token_id"]
    assert cfg["pad_token_id"] == ours_tok.pad_id and gen_cfg["do_sample"] is False
    model = AutoModelForImageTextToText.from_pretrained(out).eval()
    with torch.no_grad():
        theirs = model.generate(**enc, pixel_values=px, max_new_tokens=6,
                                do_sample=False)[0, enc["input_ids"].shape[1]:].tolist()
    ours = rt.generator.generate([prompt], GenerationConfig(
        6, stop_token_ids=stops, pad_token_id=ours_tok.pad_id,
        vocab_size=ours_tok.vocab_size))[0]
    assert theirs[:len(ours)] == ours


def test_original_export_keeps_token_ids(root):
    ckpt = write_checkpoint(root / "orig")
    export_to_hf(ckpt, root / "orig-out", layout="original")
    cfg = json.loads((root / "orig-out" / "config.json").read_text())["llm_config"]
    gen = json.loads((root / "orig-out" / "generation_config.json").read_text())
    tok = load_tokenizer(ckpt)
    im_end = tok.find_token("<|im_end|>")
    assert cfg["eos_token_id"] == im_end == gen["eos_token_id"][0]
    assert cfg["pad_token_id"] == tok.pad_id == gen["pad_token_id"]
    assert (root / "orig-out" / "tokenizer.json").is_file()
    assert not (root / "orig-out" / "preprocessor_config.json").exists()
