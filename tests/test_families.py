"""InternVL2.5 / InternVL3 / InternVL3.5 decoder families end to end through the converter.

Per family, tiny random checkpoints in both layouts (InternVL's remote-code names and
transformers' InternVLForConditionalGeneration): logits of the converted model within 1e-4 of
transformers (float32), the template read from the checkpoint itself, greedy decoding equal to
`generate`, and HF -> ours -> HF bit-exact in the layout it came from.
"""

import json

import jax.numpy as jnp
import numpy as np
import pytest
import transformers

from mini_internvl_jax.checkpoints.resolve import load_pretrained_with_info
from mini_internvl_jax.convert.exporter import export_to_hf
from mini_internvl_jax.convert.importer import convert_hf_to_orbax, open_hf
from mini_internvl_jax.infer import GenerationConfig, Generator, Prompt
from tests.helpers import hf_reference as ref
from tests.helpers.checkpoints import (
    inputs,
    native_model,
    read_tensors,
    rel_err,
    torch_logits,
    write_original,
)
from tests.test_generate import hf_generate
from tests.test_template_internvl2_5 import RELEASED_CHAT_TEMPLATE

# (name, family, tied embeddings, layouts, greedy check)
# Qwen2.5 and InternLM2.5 are the Qwen2 / InternLM2 architectures, whose conversion and parity
# tests/test_convert.py covers in both layouts; here they add the internvl2_5 template and a
# tied head, so they run with the slow tests.
CASES = [
    # InternVL3.5-1B..8B ship a separate LM head (their model cards' totals); Qwen3-0.6B/1.7B/4B
    # themselves tie it, which a model built from them keeps
    pytest.param("qwen3", "qwen3", False, ("original", "native"), True, id="qwen3"),
    pytest.param("qwen3_tied", "qwen3", True, ("original",), False, id="qwen3_tied"),
    # InternVL2.5 / InternVL3 Qwen2.5 decoders (Qwen2 architecture)
    pytest.param("qwen2_5_tied", "qwen2", True, ("original", "native"), False,
                 id="qwen2_5_tied", marks=pytest.mark.slow),
    # InternVL2.5-2B/8B: InternLM2.5 (InternLM2 architecture; natively a Llama)
    pytest.param("internlm2_5", "internlm2", False, ("original",), False, id="internlm2_5",
                 marks=pytest.mark.slow),
]


def _same_tensors(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype and a[name].tobytes() == b[name].tobytes(), name


@pytest.mark.parametrize("name,family,tie,layouts,greedy", CASES)
def test_family_converts_runs_and_round_trips(name, family, tie, layouts, greedy, tmp_path):
    model, hf_cfg = native_model(family, tie=tie)
    ids, px = inputs()
    expected = torch_logits(model, ids, px)
    for layout in layouts:
        src = tmp_path / layout
        if layout == "original":
            write_original(src, model, hf_cfg, family, template="internvl2_5")
        else:
            model.save_pretrained(src)
            (src / "tokenizer_config.json").write_text(
                json.dumps({"chat_template": RELEASED_CHAT_TEMPLATE}))
        convert_hf_to_orbax(src, tmp_path / f"{layout}-orbax")
        ours, info = load_pretrained_with_info(tmp_path / f"{layout}-orbax")
        assert ours.cfg.llm.family == family and ours.cfg.llm.tie_word_embeddings == tie
        assert info.template == "internvl2_5"  # from config.json / the folder's chat template
        err = rel_err(ours(jnp.asarray(ids), jnp.asarray(px)), expected)
        assert err <= 1e-4, f"{name} ({layout}): relative error {err}"

        export_to_hf(tmp_path / f"{layout}-orbax", tmp_path / f"{layout}-back", layout=layout)
        _same_tensors(read_tensors(src), read_tensors(tmp_path / f"{layout}-back"))
        if layout == "original":  # the exported config.json reads back to the same model
            assert open_hf(tmp_path / "original-back").info.config.replace(name="x") == \
                ours.cfg.replace(name="x")
        if layout == "native":  # transformers loads the export and computes the same logits
            back = transformers.InternVLForConditionalGeneration.from_pretrained(
                tmp_path / "native-back", attn_implementation="eager").eval()
            np.testing.assert_allclose(torch_logits(back, ids, px), expected, rtol=0,
                                       atol=1e-5)

    if greedy:  # KV-cached decoding (q/k norms on cached keys) against transformers generate
        ref.randomize_(model, std=0.3)  # sharper logits: no near-ties in greedy choices
        model.save_pretrained(tmp_path / "sharp-hf")
        convert_hf_to_orbax(tmp_path / "sharp-hf", tmp_path / "sharp")
        ours, _ = load_pretrained_with_info(tmp_path / "sharp")
        rng = np.random.RandomState(0)
        text_row = rng.randint(10, 290, size=12)
        image_row = rng.randint(10, 290, size=20)
        image_row[3:7] = ref.IMAGE_TOKEN
        tile = px[:1]
        want = hf_generate(model, [text_row, image_row], tile, max_new=8, eos=None)
        assert len(set(want[0])) > 3, f"degenerate reference output {want[0]}"
        got = Generator(ours).generate([Prompt(text_row), Prompt(image_row, tile)],
                                       GenerationConfig(8))
        assert got == want
