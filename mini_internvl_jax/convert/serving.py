"""The files a serving stack reads next to exported weights: processor, chat template,
generation config, token ids, tokenizer settings.

Native layout (transformers' `InternVLForConditionalGeneration`, what vLLM / TGI / `pipeline`
open): `preprocessor_config.json` (GotOcr2ImageProcessor: InternVL's dynamic tiling, 1 to
`MAX_TILES` tiles of the ViT's image size plus a thumbnail, bicubic, ImageNet mean/std),
`processor_config.json` (`InternVLProcessor`, image tokens per tile), `chat_template.jinja`
(the model's InternVL template, `<image>` lines for image parts), `generation_config.json`
(greedy; eos = the template's end token and the tokenizer's EOS) and a `tokenizer_config.json`
naming the image tokens the processor needs (`extra_special_tokens`) and, for the
sentencepiece families (InternLM2, Phi-3), a class transformers has built in
(`LlamaTokenizer`, `legacy: false`: with transformers 5 that encodes exactly as InternVL's
tokenizers do, checked in tests/test_export_serving.py), since their own classes are remote code.
config.json gets the bos / eos / pad ids in `text_config`.

Original layout (InternVL's remote code): the tokenizer files and remote-code `*.py` are
carried over from the converted folder; config.json's `llm_config` and generation_config.json
get the same ids (eos = the template's end token, as InternVL's `chat()` uses).

Templates and families are table-driven (`CHAT_TEMPLATES` from `data.templates.TEMPLATES`,
`SENTENCEPIECE_CLASS` per tokenizer kind), so a new family or template only adds rows there.
"""

from __future__ import annotations

import json
from pathlib import Path

from mini_internvl_jax.config import ModelConfig
from mini_internvl_jax.convert.errors import ConversionError
from mini_internvl_jax.data.templates import TEMPLATES, ChatTemplate, stop_token_ids
from mini_internvl_jax.data.tiling import IMAGENET_MEAN, IMAGENET_STD
from mini_internvl_jax.data.tokenizer import (
    IMG_CONTEXT,
    IMG_END,
    IMG_START,
    TokenizerError,
    load_tokenizer,
)

MAX_TILES = 12  # InternVL2's chat default (`max_num=12`); eval scripts use 6
PIL_BICUBIC = 3
# transformers' built-in class for each tokenizer kind whose own class is remote code
SENTENCEPIECE_CLASS = {"sentencepiece": {"tokenizer_class": "LlamaTokenizer", "legacy": False}}
IMAGE_TOKENS = {"start_image_token": IMG_START, "end_image_token": IMG_END,
                "context_image_token": IMG_CONTEXT, "video_token": "<video>"}


def chat_template_jinja(t: ChatTemplate) -> str:
    """InternVL's MPT-style template as Jinja: system (the given one or the default) + sep,
    then role + content + sep per message, image / video parts as `<image>\\n` / `<video>\\n`
    lines before the text (as InternVL's chat() places one image)."""
    def lit(s: str) -> str:
        return json.dumps(s, ensure_ascii=False)

    system = t.system_template.split("{system_message}")
    content = ("{%- if m['content'] is string -%}{{ m['content'] }}{%- else -%}"
               "{%- for c in m['content'] -%}{%- if c['type'] == 'image' -%}{{ '<image>\\n' }}"
               "{%- elif c['type'] == 'video' -%}{{ '<video>\\n' }}"
               "{%- elif c['type'] == 'text' -%}{{ c['text'] }}{%- endif -%}{%- endfor -%}"
               "{%- endif -%}")
    return (
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set m = messages[0] -%}{{ " + lit(system[0]) + " }}" + content +
        "{{ " + lit(system[1] + t.sep) + " }}"
        "{%- else -%}{{ " + lit(t.system_template.format(system_message=t.system_message)
                                + t.sep) + " }}{%- endif -%}"
        "{%- for m in messages if m['role'] != 'system' -%}"
        "{%- if m['role'] == 'user' -%}{{ " + lit(t.user_role) + " }}"
        "{%- else -%}{{ " + lit(t.assistant_role) + " }}{%- endif -%}"
        + content + "{{ " + lit(t.sep) + " }}{%- endfor -%}"
        "{%- if add_generation_prompt -%}{{ " + lit(t.assistant_role) + " }}{%- endif -%}")


def _read(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _write(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_serving_files(folder: Path, cfg: ModelConfig, layout: str) -> None:
    """Adds / completes the serving files in `folder` (an export being written, holding
    config.json and the tokenizer files copied from the source)."""
    folder = Path(folder)
    if cfg.template not in TEMPLATES:
        raise ConversionError(f"chat template {cfg.template!r} has no serving template; known: "
                              f"{sorted(TEMPLATES)}")
    template = TEMPLATES[cfg.template]
    try:
        tok = load_tokenizer(folder)
        stops = list(stop_token_ids(tok, template))
    except (TokenizerError, FileNotFoundError, OSError) as e:
        raise ConversionError(f"{folder}: the serving files need the model's tokenizer, with "
                              f"the tokens of its {template.name} template: {e}") from None
    ids = {"bos_token_id": tok.bos_id, "eos_token_id": stops[0], "pad_token_id": tok.pad_id}
    gen = {**_read(folder / "generation_config.json"), **ids, "eos_token_id": stops,
           "do_sample": False}
    gen.pop("transformers_version", None)
    _write(folder / "generation_config.json", gen)
    config = _read(folder / "config.json")
    sub = "llm_config" if layout == "original" else "text_config"
    config[sub] = {**config.get(sub, {}), **ids}
    _write(folder / "config.json", config)
    if layout == "original":
        return
    tc = _read(folder / "tokenizer_config.json")
    for key in ("auto_map", "tokenizer_class"):  # remote-code classes do not load natively
        tc.pop(key, None)
    tc.update(SENTENCEPIECE_CLASS.get(tok.kind, {}))
    tc.update(processor_class="InternVLProcessor",
              extra_special_tokens={**tc.get("extra_special_tokens", {}), **IMAGE_TOKENS},
              pad_token=tok.decode([tok.pad_id]),
              eos_token=tok.decode([tok.eos_id]) if tok.eos_id is not None else None)
    _write(folder / "tokenizer_config.json", tc)
    size = {"height": cfg.vision.image_size, "width": cfg.vision.image_size}
    _write(folder / "preprocessor_config.json", {
        "image_processor_type": "GotOcr2ImageProcessor", "processor_class": "InternVLProcessor",
        "crop_to_patches": True, "min_patches": 1, "max_patches": MAX_TILES, "size": size,
        "do_resize": True, "resample": PIL_BICUBIC, "do_rescale": True,
        "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(IMAGENET_MEAN),
        "image_std": list(IMAGENET_STD), "do_convert_rgb": True})
    _write(folder / "processor_config.json", {"processor_class": "InternVLProcessor",
                                              "image_seq_length": cfg.num_image_tokens})
    (folder / "chat_template.jinja").write_text(chat_template_jinja(template), encoding="utf-8")
    (folder / "chat_template.json").unlink(missing_ok=True)  # one template source only
