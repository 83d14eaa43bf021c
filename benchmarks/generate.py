"""Generation benchmark: prefill and decode tokens/s of our KV-cache generator, and of
transformers `generate` on the same LLM shape when torch + CUDA are available.

Random weights, text-only prompts of --prompt-len tokens, --new-tokens greedy tokens without a
stop token (every row decodes all of them). For each batch size:
  * prefill tok/s = batch x prompt_len / time of the prompt forward (+ first token);
  * decode tok/s  = batch x (new_tokens - 1) / (time of the whole generate - prefill time),
    for the on-device `lax.while_loop` driver (jax) and the host loop with one dispatch per
    token that streaming uses (jax_stream);
  * transformers: the same shapes through `Qwen2ForCausalLM` (or Phi3/Llama for those presets),
    bf16, sdpa attention, default dynamic cache: prefill = a forward with logits for the last
    position only, decode from `generate(max_new_tokens)` minus that.
Times are medians over --repeats runs after one warm-up (which compiles).

  python benchmarks/generate.py --out gen.json                         # 1B preset (GPU/TPU)
  python benchmarks/generate.py --preset tiny-qwen2 --small --out gen.json   # CPU smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import traceback

# JAX must leave GPU memory to torch when both run in one process.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.6")

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mini_internvl_jax.config import ComputeConfig, load_model_config  # noqa: E402
from mini_internvl_jax.fileio import write_atomic  # noqa: E402
from mini_internvl_jax.infer.generate import GenerationConfig, Generator, Prompt  # noqa: E402
from mini_internvl_jax.models import InternVLModel  # noqa: E402
from mini_internvl_jax.sharding import create_sharded_model, make_mesh  # noqa: E402


def timed(fn, repeats: int) -> float:
    """Median seconds of `fn()` (which must block until its results exist) after a warm-up."""
    fn()
    samples = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - t)
    return statistics.median(samples)


def build_model(cfg, compute):
    """Random parameters created by one jitted init on the first device."""
    mesh = make_mesh(1, 1, 1, devices=jax.devices()[:1])
    return create_sharded_model(lambda: InternVLModel(cfg, compute, rngs=nnx.Rngs(0)), mesh)


def bench_jax(cfg, compute, batch: int, prompt_len: int, new_tokens: int, repeats: int
              ) -> dict:
    gen = Generator(build_model(cfg, compute))
    rng = np.random.RandomState(0)
    hi = min(cfg.llm.vocab_size, 30000)
    prompts = [Prompt(rng.randint(100, hi, size=prompt_len)) for _ in range(batch)]
    cfg_gen = GenerationConfig(new_tokens, min_length_bucket=1)

    def prefill():
        np.asarray(gen.start(prompts, cfg_gen).tokens)

    def full():
        gen.generate(prompts, cfg_gen)

    def stream():
        for _ in gen.stream(prompts, cfg_gen):
            pass

    t_pre = timed(prefill, repeats)
    t_gen = timed(full, repeats)
    t_stream = timed(stream, repeats)
    decoded = batch * (new_tokens - 1)
    out = {"prefill_s": t_pre, "generate_s": t_gen, "stream_s": t_stream,
           "prefill_tok_s": batch * prompt_len / t_pre}
    out.update(_decode_rate(decoded, t_gen - t_pre, "decode_tok_s"))
    out.update(_decode_rate(decoded, t_stream - t_pre, "stream_decode_tok_s"))
    return out


def _decode_rate(tokens: int, seconds: float, key: str) -> dict:
    """Left out when decoding took no measurable time beyond the prefill (timing noise)."""
    return {key: tokens / seconds} if seconds > 0 else {}


def hf_llm(cfg, torch, transformers):
    """The LLM of `cfg` as a transformers CausalLM (bf16, sdpa) with random weights."""
    llm = cfg.llm
    common = dict(vocab_size=llm.vocab_size, hidden_size=llm.hidden_size,
                  intermediate_size=llm.intermediate_size, num_hidden_layers=llm.num_layers,
                  num_attention_heads=llm.num_heads, num_key_value_heads=llm.num_kv_heads,
                  max_position_embeddings=llm.max_position_embeddings,
                  rms_norm_eps=llm.rms_norm_eps, rope_theta=llm.rope_theta,
                  tie_word_embeddings=llm.tie_word_embeddings, attn_implementation="sdpa",
                  pad_token_id=0, bos_token_id=1, eos_token_id=2)
    if llm.family == "qwen2":
        hf_cfg, cls = transformers.Qwen2Config(**common, use_sliding_window=False), \
            transformers.Qwen2ForCausalLM
    elif llm.family == "phi3":
        rs = llm.rope_scaling
        ones = [1.0] * (llm.head_dim // 2)
        scaling = None if rs is None else {
            "type": "longrope", "short_factor": list(rs.short_factor or ones),
            "long_factor": list(rs.long_factor or ones)}
        hf_cfg = transformers.Phi3Config(
            **common, rope_scaling=scaling,
            original_max_position_embeddings=None if rs is None
            else rs.original_max_position_embeddings)
        cls = transformers.Phi3ForCausalLM
    else:  # llama, and internlm2 whose math is Llama's
        hf_cfg, cls = transformers.LlamaConfig(**common, head_dim=llm.head_dim), \
            transformers.LlamaForCausalLM
    with torch.device("cuda"):
        model = cls(hf_cfg).to(torch.bfloat16)
    return model.eval()


def bench_hf(model, torch, vocab: int, batch: int, prompt_len: int, new_tokens: int,
             repeats: int) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(100, min(vocab, 30000), (batch, prompt_len), generator=g).cuda()
    mask = torch.ones_like(ids)

    def prefill():
        with torch.no_grad():
            model(input_ids=ids, attention_mask=mask, use_cache=True, logits_to_keep=1)
        torch.cuda.synchronize()

    def full():
        with torch.no_grad():
            model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens,
                           do_sample=False, pad_token_id=0, eos_token_id=None)
        torch.cuda.synchronize()

    t_pre = timed(prefill, repeats)
    t_gen = timed(full, repeats)
    return {"prefill_s": t_pre, "generate_s": t_gen,
            "prefill_tok_s": batch * prompt_len / t_pre,
            **_decode_rate(batch * (new_tokens - 1), t_gen - t_pre, "decode_tok_s")}


def torch_cuda():
    try:
        import torch
        import transformers
    except ImportError:
        return None
    return (torch, transformers) if torch.cuda.is_available() else None


def _num(d: dict, k: str) -> str:
    return f"{d[k]:.1f}" if k in d else "-"


def _ratio(j: dict, h: dict, k: str) -> str:
    return f"{j[k] / h[k]:.2f}" if k in j and k in h else "-"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="mini-internvl-1b")
    p.add_argument("--small", action="store_true",
                   help="prompt 32 / 32 new tokens (CPU smoke run)")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 16])
    p.add_argument("--prompt-len", type=int, default=512)
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    p.add_argument("--no-scan", action="store_true",
                   help="unrolled layers (slower compile) instead of one scanned layer")
    p.add_argument("--no-hf", action="store_true", help="skip the transformers comparison")
    p.add_argument("--out", default="generate_bench.json", help="JSON results path")
    args = p.parse_args(argv)
    if args.small:
        args.prompt_len, args.new_tokens = 32, 32
    cfg = load_model_config(args.preset)
    compute = ComputeConfig(dtype=args.dtype, param_dtype=args.dtype,
                            scan_layers=not args.no_scan)
    device = jax.devices()[0]
    print(f"device: {device.device_kind} ({device.platform}); preset {args.preset}, "
          f"{args.dtype}, prompt {args.prompt_len}, {args.new_tokens} new tokens", flush=True)

    results = []
    for b in args.batch_sizes:
        row = {"batch": b}
        try:
            row["jax"] = bench_jax(cfg, compute, b, args.prompt_len, args.new_tokens, args.repeats)
        except Exception:  # keep the other measurements
            row["jax_error"] = traceback.format_exc(limit=3)
        results.append(row)
        print(json.dumps(row), flush=True)

    hf = None if args.no_hf else torch_cuda()
    if hf is not None:
        torch, transformers = hf
        try:
            model = hf_llm(cfg, torch, transformers)
            for row in results:
                try:
                    row["transformers"] = bench_hf(model, torch, cfg.llm.vocab_size,
                                                   row["batch"], args.prompt_len,
                                                   args.new_tokens, args.repeats)
                except Exception:
                    row["transformers_error"] = traceback.format_exc(limit=3)
        except Exception:
            for row in results:
                row["transformers_error"] = traceback.format_exc(limit=3)

    header = (f"{'batch':>5} | {'jax prefill':>12} {'jax decode':>11} {'jax stream':>11} | "
              f"{'hf prefill':>11} {'hf decode':>10} | {'prefill x':>9} {'decode x':>9}")
    print("\ntokens/s (x = jax / transformers)\n" + header + "\n" + "-" * len(header))
    errors = []
    for row in results:
        j, h = row.get("jax", {}), row.get("transformers", {})
        print(f"{row['batch']:>5} | {_num(j, 'prefill_tok_s'):>12} {_num(j, 'decode_tok_s'):>11} "
              f"{_num(j, 'stream_decode_tok_s'):>11} | {_num(h, 'prefill_tok_s'):>11} "
              f"{_num(h, 'decode_tok_s'):>10} | {_ratio(j, h, 'prefill_tok_s'):>9} "
              f"{_ratio(j, h, 'decode_tok_s'):>9}")
        errors += [(row["batch"], k, v) for k, v in row.items() if k.endswith("_error")]
    for batch, k, v in errors:
        print(f"\nbatch {batch} {k}:\n{v}", file=sys.stderr)
    write_atomic(args.out, json.dumps({
        "benchmark": "generate", "device": device.device_kind, "platform": device.platform,
        "preset": args.preset, "dtype": args.dtype, "scan_layers": not args.no_scan,
        "prompt_len": args.prompt_len, "new_tokens": args.new_tokens,
        "repeats": args.repeats, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.out}")
    return 1 if errors else 0


if __name__ == "__main__":
    sys.exit(main())
