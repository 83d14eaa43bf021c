"""KV-cache generation: transformers `generate` parity, cache vs full forward, drivers, mesh."""

import jax
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from mini_internvl_jax.config import load_model_config
from mini_internvl_jax.convert.mapping import model_rules
from mini_internvl_jax.infer import GenerationConfig, Generator, Prompt, SamplingConfig
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.models.internvl import ImageTokenMismatchError
from mini_internvl_jax.sharding import make_mesh, state_shardings
from tests.helpers import hf_reference as ref
from tests.helpers.torch_rules import load_rules_into, torch_state_reader


def ours_from_torch(cfg, torch_model):
    with nnx.use_eager_sharding(False):
        model = InternVLModel(cfg, rngs=nnx.Rngs(0))
    load_rules_into(model, model_rules(cfg, "native"), torch_state_reader(torch_model.state_dict()),
                    scan=model.compute.scan_layers)
    return model


def random_model(preset: str, seed: int = 0, std: float = 0.1):
    """A preset model with all parameters perturbed, so greedy outputs are not degenerate."""
    cfg = load_model_config(preset)
    with nnx.use_eager_sharding(False):
        model = InternVLModel(cfg, rngs=nnx.Rngs(0))
    rng = np.random.RandomState(seed)
    params = nnx.state(model, nnx.Param)
    nnx.update(model, jax.tree.map(
        lambda x: np.asarray(x) + std * rng.randn(*x.shape).astype(np.float32), params))
    return model


def hf_generate(model, rows, pixel_values, *, max_new, eos):
    """transformers greedy generate on a left-padded batch; new tokens per row, cut at eos."""
    length = max(len(r) for r in rows)
    ids = np.zeros((len(rows), length), np.int64)
    mask = np.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, length - len(r):] = r
        mask[i, length - len(r):] = 1
    kw = {} if pixel_values is None else {"pixel_values": torch.tensor(pixel_values)}
    with torch.no_grad():
        out = model.generate(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                             max_new_tokens=max_new, do_sample=False, pad_token_id=0,
                             eos_token_id=eos, **kw)[:, length:].numpy()
    result = []
    for row in out:
        row = list(map(int, row))
        if eos is not None and eos in row:
            row = row[:row.index(eos) + 1]
        result.append(row)
    return result


@pytest.mark.parametrize("text", ["qwen2", "phi3"])
def test_greedy_equals_transformers_generate(text):
    """A text row and an image row batched together; phi3's image row crosses the LongRoPE
    switch (original_max_position_embeddings=32) during generation."""
    hf_cfg, cfg = ref.internvl_pair(text)
    torch_model = ref.randomize_(transformers.InternVLForConditionalGeneration(hf_cfg), std=0.3)
    ours = Generator(ours_from_torch(cfg, torch_model))
    rng = np.random.RandomState(0)
    text_row = rng.randint(10, 290, size=12)
    image_row = rng.randint(10, 290, size=28)
    image_row[3:7] = ref.IMAGE_TOKEN  # one 56px tile = 4 tokens
    px = rng.randn(1, 3, 56, 56).astype(np.float32)
    n = 10

    free = hf_generate(torch_model, [text_row, image_row], px, max_new=n, eos=None)
    assert len(set(free[0])) > 3, f"degenerate reference output {free[0]}"
    got = ours.generate([Prompt(text_row), Prompt(image_row, px)], GenerationConfig(n))
    assert got == free

    # a stop token that row 0 produces at step 5 ends that row there, and only that row
    stop = free[0][5]
    expected = hf_generate(torch_model, [text_row, image_row], px, max_new=n, eos=stop)
    got = ours.generate([Prompt(text_row), Prompt(image_row, px)],
                        GenerationConfig(n, stop_token_ids=(stop,)))
    assert got == expected and got[0][-1] == stop and len(got[0]) <= 6

    # text only: no tile buffer at all
    alone = hf_generate(torch_model, [text_row], None, max_new=n, eos=None)
    assert ours.generate([Prompt(text_row)], GenerationConfig(n)) == alone


@pytest.mark.parametrize("preset", ["tiny-qwen2", "tiny-phi3"])
def test_cached_decode_equals_full_forward_every_step(preset):
    """Step-t logits of the cached, left-padded batch == a cache-free forward of each row's
    prompt + its first t generated tokens (float32)."""
    model = random_model(preset)
    cfg = model.cfg
    rng = np.random.RandomState(1)
    per_tile = cfg.num_image_tokens
    img = np.concatenate([[7, 8], [cfg.image_token_id] * (2 * per_tile), [9, 10, 11]])
    px = rng.randn(2, 3, 56, 56).astype(np.float32)
    prompts = [Prompt(rng.randint(10, 500, size=5)), Prompt(img, px)]
    gen = GenerationConfig(max_new_tokens=6, sampling=SamplingConfig(temperature=1.0))
    g = Generator(model)
    st = g.start(prompts, gen, seed=3)
    tokens, logits = [np.asarray(st.tokens)], [np.asarray(st.logits)]
    for _ in range(gen.max_new_tokens - 1):
        st = g.step(st, gen)
        tokens.append(np.asarray(st.tokens))
        logits.append(np.asarray(st.logits))
    tokens, logits = np.stack(tokens, 1), np.stack(logits, 1)  # [B, steps], [B, steps, V]

    # one cache-free forward over both rows, right-padded (segment id 0) to a common length
    rows = [np.concatenate([np.asarray(p.input_ids), tokens[r, :-1]]) for r, p in
            enumerate(prompts)]
    length = max(len(x) for x in rows)
    ids = np.zeros((len(rows), length), np.int32)
    seg = np.zeros_like(ids)
    for r, x in enumerate(rows):
        ids[r, :len(x)], seg[r, :len(x)] = x, 1
    full = np.asarray(nnx.jit(lambda m, *a: m(*a))(model, ids, px, None, None, seg))
    for r, p in enumerate(prompts):
        n = len(p.input_ids)
        expected = full[r, n - 1:n - 1 + gen.max_new_tokens]
        err = np.max(np.abs(logits[r] - expected)) / np.max(np.abs(expected))
        assert err <= 1e-5, f"row {r}: relative error {err}"


def test_on_device_loop_equals_streaming_and_stops_early():
    model = random_model("tiny-qwen2", seed=2)
    g = Generator(model)
    rng = np.random.RandomState(2)
    prompts = [Prompt(rng.randint(10, 500, size=9)), Prompt(rng.randint(10, 500, size=30))]
    sampled = GenerationConfig(max_new_tokens=12, sampling=SamplingConfig(0.9, top_k=40,
                                                                          top_p=0.95))
    streamed = np.stack(list(g.stream(prompts, sampled, seed=7)), 1)
    assert streamed.shape == (2, 12)
    assert g.generate(prompts, sampled, seed=7) == streamed.tolist()
    assert g.generate(prompts, sampled, seed=8) != streamed.tolist()

    stop = int(streamed[0, 3])
    first = list(streamed[0]).index(stop)
    gen = GenerationConfig(max_new_tokens=12, sampling=sampled.sampling, stop_token_ids=(stop,),
                           pad_token_id=1)
    got = g.generate(prompts, gen, seed=7)
    assert got[0] == streamed[0, :first + 1].tolist()
    row1 = streamed[1].tolist()
    assert got[1] == row1[:row1.index(stop) + 1 if stop in row1 else 12]
    steps = np.stack(list(g.stream(prompts, gen, seed=7)), 1)
    assert np.all(steps[0, first + 1:] == 1)  # finished rows emit padding
    # extra batch rows (fixed batch size for evaluation) do not change real rows
    assert g.generate(prompts, gen, seed=7, batch_size=4) == got


def test_prompt_lengths_share_one_compile_per_bucket():
    from mini_internvl_jax.infer.generate import _generate_jit

    g = Generator(random_model("tiny-qwen2"))
    gen = GenerationConfig(max_new_tokens=3)
    before = _generate_jit._cache_size()
    for n in (5, 17, 64):
        g.generate([Prompt(np.arange(10, 10 + n))], gen)
    g.generate([Prompt(np.arange(10, 20))], GenerationConfig(3, stop_token_ids=(4, 5)))
    # another model of the same architecture reuses the compiled code
    Generator(random_model("tiny-qwen2", seed=9)).generate([Prompt([11, 12])], gen)
    assert _generate_jit._cache_size() - before == 1
    g.generate([Prompt(np.arange(10, 80))], gen)  # 70 tokens: the 128 bucket
    assert _generate_jit._cache_size() - before == 2


def test_bad_prompts_are_rejected_with_the_reason():
    g = Generator(random_model("tiny-qwen2"))
    cfg = g.cfg
    gen = GenerationConfig(max_new_tokens=2)
    px = np.zeros((1, 3, 56, 56), np.float32)
    with pytest.raises(ImageTokenMismatchError, match="prompt 1 has 3 <IMG_CONTEXT>"):
        g.generate([Prompt([9, 10]), Prompt([cfg.image_token_id] * 3, px)], gen)
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        g.generate([Prompt([])], gen)
    with pytest.raises(ValueError, match=r"pixel_values must be \[tiles, 3, 56, 56\]"):
        g.generate([Prompt([cfg.image_token_id] * 4, np.zeros((1, 3, 28, 28)))], gen)
    with pytest.raises(ValueError, match="outside"):
        g.generate([Prompt([cfg.llm.vocab_size])], gen)
    with pytest.raises(ValueError, match="image placeholder"):
        g.generate([Prompt([9])], GenerationConfig(2, pad_token_id=cfg.image_token_id))


def test_sharded_generation_equals_single_device():
    """Parameters on a (data 2, fsdp 2, tensor 2) mesh of fake CPU devices."""
    model = random_model("tiny-qwen2", seed=4)
    rng = np.random.RandomState(4)
    cfg = model.cfg
    img = np.concatenate([[7], [cfg.image_token_id] * cfg.num_image_tokens, [9, 10]])
    prompts = [Prompt(rng.randint(10, 500, size=11)),
               Prompt(img, rng.randn(1, 3, 56, 56).astype(np.float32))]
    gen = GenerationConfig(max_new_tokens=8)
    expected = Generator(model).generate(prompts, gen)

    mesh = make_mesh(data=2, fsdp=2, tensor=2)
    graphdef, state = nnx.split(model)
    sharded = nnx.merge(graphdef, jax.device_put(state, state_shardings(state, mesh)))
    kernel = sharded.llm.layers.layers[0].q_proj.kernel[...]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    assert Generator(sharded, mesh=mesh).generate(prompts, gen) == expected
