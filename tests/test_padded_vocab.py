"""Checkpoints whose embedding table is padded beyond the tokenizer: generation never picks a
padded id (chat's streaming driver and eval's batch driver), and decoding one never raises.

Reference: the same weights without the padded rows (vocab 512 = the tokenizer's), whose greedy
tokens are what the masked padded model must produce."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from mini_internvl_jax.cli.evaluate import make_answer_fn
from mini_internvl_jax.config import load_model_config
from mini_internvl_jax.data.tokenizer import load_tokenizer
from mini_internvl_jax.infer.generate import GenerationConfig, Generator
from mini_internvl_jax.infer.runtime import Runtime, TextStream
from mini_internvl_jax.infer.scorers.tasks import Item
from mini_internvl_jax.infer.session import ChatSession
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.tools.demo import write_demo

PAD = 64  # extra embedding rows beyond the tokenizer's 512


def _model(vocab: int, flat: dict):
    """tiny-qwen2 with `vocab` rows, built from the shapes (no eager init) and `flat` params
    (cut to the vocabulary where it is smaller)."""
    cfg = load_model_config("tiny-qwen2")
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=vocab))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: InternVLModel(cfg, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    leaves = []
    for path, v in nnx.to_flat_state(state):
        x = flat[tuple(path)]
        leaves.append((path, jax.numpy.asarray(x[tuple(slice(0, n) for n in v.shape)])))
    return nnx.merge(graphdef, nnx.from_flat_state(leaves))


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("padvocab")
    write_demo(root / "demo", num_stage1=2, num_stage2=4)
    cfg = load_model_config("tiny-qwen2")
    cfg = cfg.replace(llm=dataclasses.replace(cfg.llm, vocab_size=512 + PAD))
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(lambda: InternVLModel(cfg, rngs=nnx.Rngs(0)))
    rng = np.random.RandomState(3)
    flat = {}
    for path, v in nnx.to_flat_state(nnx.state(abstract)):
        x = 0.1 * rng.randn(*v.shape)
        if "norm" in "/".join(map(str, path)) and str(path[-1]) == "weight":
            x += 1.0
        flat[tuple(path)] = x.astype(v.dtype)
    # The padded output columns dominate: an unmasked greedy run picks them.
    head = next(k for k in flat if str(k[-1]) == "lm_head")
    flat[head][:, 512:] = 30 * flat[head][:, :PAD]
    padded, plain = _model(512 + PAD, flat), _model(512, flat)
    toks = {f: load_tokenizer(root / "demo" / "tokenizers" / f) for f in ("qwen2", "internlm2")}
    return padded, plain, toks


def test_padded_ids_are_never_generated_and_decode_cannot_crash(models):
    padded, plain, toks = models
    assert all(t.vocab_size == 512 for t in toks.values())
    sp = toks["internlm2"]  # sentencepiece: its decode used to raise IndexError
    rt = Runtime(Generator(padded), sp, "internlm2-chat", max_num=1)
    prompt, stops = rt.prompt((), "Hi")
    unmasked = rt.generator.generate([prompt], GenerationConfig(5))[0]
    assert max(unmasked) >= 512  # the test can fail: unmasked, padded ids win

    want = Generator(plain).generate([prompt], GenerationConfig(5, stop_token_ids=stops))[0]
    got = rt.generator.generate([prompt], GenerationConfig(5, stop_token_ids=stops,
                                                           vocab_size=512))[0]
    assert got == want and max(got) < 512
    # chat (streaming driver) and eval (batch driver) through the runtime
    assert ChatSession(rt, max_new_tokens=5).ask("Hi").token_ids == want
    assert make_answer_fn(rt, 5, 1)([Item("q1", "Hi", (), {})]) == [rt.decode(want, stops)]

    # decoding unknown ids (beyond the vocabulary, negative) drops them, for both kinds
    for tok in toks.values():
        ids = tok.encode("a red circle")
        assert tok.decode([ids[0], 600, 512, *ids[1:], -1]) == tok.decode(ids)
        stream = TextStream(tok, ())
        text = "".join(stream.push(i) for i in [*ids, 530]) + stream.flush()
        assert text == tok.decode(ids)
