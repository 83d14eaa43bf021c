"""Attention benchmark: dense XLA vs cuDNN vs JAX's shipped Pallas kernels vs ours.

Shapes (bf16): ViT 24x1025 tokens, 16 heads of 64, bidirectional; LLM 4x4096 tokens, 14 query /
2 kv heads of 64, causal, without and with 4 packed segments per row. Each (shape, impl) is
timed forward and forward+backward (median of --iters samples after warmup, each sample
--inner back-to-back calls ended by block_until_ready). Every measurement sits in its own
try/except, so one failing implementation is recorded in the table instead of ending the run.

  python benchmarks/attention.py --out bench.json              # real shapes (GPU/TPU)
  python benchmarks/attention.py --small --out bench.json      # tiny shapes; CPU: interpreter
  python benchmarks/attention.py --sweep --impls ours          # + block-size sweep (GPU)
  python benchmarks/attention.py --check                       # + kernel-vs-dense errors
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import statistics
import sys
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from mini_internvl_jax.kernels import (  # noqa: E402
    AttentionMask,
    dispatch,
    dot_product_attention,
    flash_gpu,
)

IMPLS = ("xla", "cudnn", "jax_pallas", "ours")


@dataclasses.dataclass(frozen=True)
class Shape:
    name: str
    batch: int
    seq: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool
    segments: int  # packed segments per row (0 = none)

    def flops(self, backward: bool) -> float:
        """Matmul FLOPs (forward 4 B S^2 H D, halved when causal; backward 2.5x forward)."""
        f = 4.0 * self.batch * self.seq**2 * self.heads * self.head_dim
        f = f / 2 if self.causal else f
        return f * 3.5 if backward else f


FULL = (Shape("vit", 24, 1025, 16, 16, 64, False, 0),
        Shape("llm_causal", 4, 4096, 14, 2, 64, True, 0),
        Shape("llm_packed", 4, 4096, 14, 2, 64, True, 4),
        # Not run by default (--shapes): the other two LLM families' head layouts.
        Shape("internlm2", 2, 4096, 16, 8, 128, True, 4),
        Shape("phi3", 2, 4096, 32, 32, 96, True, 4))
SMALL = (Shape("vit", 2, 77, 2, 2, 64, False, 0),
         Shape("llm_causal", 1, 256, 4, 2, 64, True, 0),
         Shape("llm_packed", 1, 256, 4, 2, 64, True, 4),
         Shape("internlm2", 1, 128, 4, 2, 128, True, 2),
         Shape("phi3", 1, 100, 2, 2, 96, True, 2))


def make_inputs(shape: Shape, dtype, seed=0):
    ks = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(ks[0], (shape.batch, shape.seq, shape.heads, shape.head_dim), dtype)
    kv = (shape.batch, shape.seq, shape.kv_heads, shape.head_dim)
    k = jax.random.normal(ks[1], kv, dtype)
    v = jax.random.normal(ks[2], kv, dtype)
    do = jax.random.normal(ks[3], q.shape, dtype)
    seg = None
    if shape.segments:
        # Segments of random lengths, the last 3% of each row padding (id 0).
        rng = np.random.RandomState(seed)
        n_valid = shape.seq - shape.seq // 32
        seg = np.zeros((shape.batch, shape.seq), np.int32)
        for b in range(shape.batch):
            cuts = np.sort(rng.choice(np.arange(1, n_valid), shape.segments - 1, replace=False))
            seg[b, :n_valid] = np.searchsorted(cuts, np.arange(n_valid), side="right") + 1
        seg = jnp.asarray(seg)
    return q, k, v, seg, do


# ----------------------------------------------------------------------------- implementations


def _shipped_gpu(q, k, v, seg, *, causal, interpret):
    """jax.experimental.pallas.ops.gpu.attention.mha: needs repeated K/V and a sequence that
    its blocks divide, so pad to a multiple of 128 and mask the tail with segment ids."""
    from jax.experimental.pallas.ops.gpu import attention as mha_lib

    b, s, h, d = q.shape
    g = h // k.shape[2]
    k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))
    sp = -(-s // 128) * 128
    if sp != s or seg is not None:
        base = jnp.ones((b, s), jnp.int32) if seg is None else seg
        seg = jnp.pad(base, ((0, 0), (0, sp - s)))
        q, k, v = (jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for x in (q, k, v))
    out = mha_lib.mha(q, k, v, seg, sm_scale=d**-0.5, causal=causal, interpret=interpret)
    return out[:, :s]


def _shipped_tpu(q, k, v, seg, *, causal, interpret):
    """Splash attention (jax.experimental.pallas.ops.tpu.splash_attention), vmapped over batch."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    b, s, h, d = q.shape
    g = h // k.shape[2]
    k, v = (jnp.repeat(x, g, axis=2) for x in (k, v))
    sp = -(-s // 128) * 128
    base = jnp.ones((b, s), jnp.int32) if seg is None else seg
    seg = jnp.pad(base, ((0, 0), (0, sp - s)))
    q, k, v = (jnp.pad(x, ((0, 0), (0, sp - s), (0, 0), (0, 0))) for x in (q, k, v))
    mask = sm.CausalMask((sp, sp)) if causal else sm.FullMask((sp, sp))
    kernel = sk.make_splash_mha(sm.MultiHeadMask([mask] * h), head_shards=1, q_seq_shards=1,
                                interpret=interpret)
    to_hsd = lambda x: jnp.swapaxes(x, 1, 2)
    out = jax.vmap(lambda q, k, v, sg: kernel(q, k, v, segment_ids=sk.SegmentIds(sg, sg)))(
        to_hsd(q * d**-0.5), to_hsd(k), to_hsd(v), seg)
    return jnp.swapaxes(out, 1, 2)[:, :s]


def attention_fn(impl: str, causal: bool, platform: str, block_sizes=None):
    """(q, k, v, seg) -> out for one implementation."""
    if impl == "xla":
        return lambda q, k, v, seg: dot_product_attention(q, k, v, AttentionMask(causal, seg))
    if impl == "cudnn":
        return lambda q, k, v, seg: dispatch.attention(q, k, v, AttentionMask(causal, seg),
                                                       impl="cudnn")
    if impl == "jax_pallas":
        fn = _shipped_tpu if platform == "tpu" else _shipped_gpu
        return functools.partial(fn, causal=causal, interpret=platform == "cpu")
    if impl == "ours":
        return lambda q, k, v, seg: dispatch.attention(q, k, v, AttentionMask(causal, seg),
                                                       impl="pallas", block_sizes=block_sizes)
    raise ValueError(impl)


# ----------------------------------------------------------------------------- timing


def time_fn(fn, args, *, warmup: int, iters: int, inner: int) -> float:
    """Median milliseconds per call."""
    jax.block_until_ready(fn(*args))  # compile
    for _ in range(warmup):
        jax.block_until_ready(fn(*args))
    samples = []
    for _ in range(iters):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn(*args)
        jax.block_until_ready(out)
        samples.append((time.perf_counter() - t0) * 1e3 / inner)
    return statistics.median(samples)


def measure(impl, shape, inputs, *, platform, args, block_sizes=None, reference=None,
            modes=("fwd", "fwd_bwd")):
    """One row: forward and/or forward+backward times, or the error that stopped them."""
    q, k, v, seg, do = inputs
    row = {"shape": shape.name, "impl": impl}
    attn = attention_fn(impl, shape.causal, platform, block_sizes)

    def fwd_bwd(q, k, v, seg, do):
        _, vjp = jax.vjp(lambda q, k, v: attn(q, k, v, seg), q, k, v)
        return vjp(do)

    for mode in modes:
        try:
            if mode == "fwd":
                fn, fn_args = jax.jit(attn), (q, k, v, seg)
                if reference is not None and impl != "xla":
                    out = fn(*fn_args).astype(jnp.float32)
                    # Rows of padding (segment 0) are zeros by contract; the shipped kernels
                    # differ there, so compare real tokens only.
                    keep = 1.0 if seg is None else (seg != 0)[:, :, None, None]
                    err = jnp.max(jnp.abs(out - reference) * keep)
                    row["max_abs_err"] = float(err / jnp.max(jnp.abs(reference)))
            else:
                fn, fn_args = jax.jit(fwd_bwd), (q, k, v, seg, do)
            ms = time_fn(fn, fn_args, warmup=args.warmup, iters=args.iters, inner=args.inner)
            row[f"{mode}_ms"] = ms
            row[f"{mode}_tflops"] = shape.flops(mode == "fwd_bwd") / ms / 1e9
        except Exception as e:  # noqa: BLE001 - recorded in the table, the run goes on
            row["error"] = f"{mode}: {type(e).__name__}: {str(e).splitlines()[0][:200]}"
            if args.verbose:
                traceback.print_exc()
            break
    return row


def sweep_configs():
    """GPU block-size configurations around the defaults (H100, D=64): forward ones are timed
    forward only, backward ones forward+backward with the default forward."""
    base = flash_gpu.BlockSizes.default(64, causal=False)
    fwd = [(64, 64, 4, 3), (128, 64, 8, 3), (64, 32, 4, 3)]
    bwd = [(64, 64, 64, 64, 4, 3), (64, 64, 64, 64, 4, 2), (64, 64, 64, 64, 8, 3),
           (64, 64, 64, 32, 4, 3), (128, 64, 64, 64, 8, 2)]
    fwd_keys = ("block_q", "block_kv", "num_warps", "num_stages")
    bwd_keys = ("block_q_dkv", "block_kv_dkv", "block_q_dq", "block_kv_dq", "num_warps_bwd",
                "num_stages_bwd")
    label = lambda kind, c: kind + ":" + "/".join(map(str, c))
    configs = [("fwd", label("fwd", c),
                dataclasses.replace(base, **dict(zip(fwd_keys, c, strict=True)))) for c in fwd]
    configs += [("bwd", label("bwd", c),
                 dataclasses.replace(base, **dict(zip(bwd_keys, c, strict=True)))) for c in bwd]
    return configs


def _out_and_grads(impl, causal, q, k, v, seg, do):
    f = lambda q, k, v: dispatch.attention(q, k, v, AttentionMask(causal, seg), impl=impl)
    out, vjp = jax.vjp(f, q, k, v)
    return (out, *vjp(do))


def check_rows():
    """Our kernel vs the dense reference on this backend: output and the three gradients."""
    f32, bf16 = jnp.float32, jnp.bfloat16
    cases = [(2, 1025, 4, 4, 64, False, 0, f32), (2, 1025, 4, 4, 64, False, 0, bf16),
             (1, 777, 14, 2, 64, True, 3, bf16), (1, 300, 4, 2, 96, True, 2, f32),
             (1, 300, 8, 4, 128, False, 2, bf16), (1, 77, 7, 1, 64, True, 0, f32)]
    rows = []
    for b, s, h, kvh, d, causal, nseg, dtype in cases:
        shape = Shape("check", b, s, h, kvh, d, causal, nseg)
        inputs = make_inputs(shape, dtype, seed=1)
        row = {"case": f"B{b} S{s} H{h}/{kvh} D{d} causal={causal} seg={nseg} "
                       f"{jnp.dtype(dtype).name}"}
        try:
            run = jax.jit(_out_and_grads, static_argnums=(0, 1))
            got = run("pallas", causal, *inputs)
            with jax.default_matmul_precision("highest"):  # no TF32 in the f32 reference
                want = run("xla", causal, *inputs)
            for name, a, r in zip(("out", "dq", "dk", "dv"), got, want, strict=True):
                a, r = a.astype(jnp.float32), r.astype(jnp.float32)
                row[name] = float(jnp.linalg.norm(a - r) / jnp.linalg.norm(r))
                row[name + "_finite"] = bool(jnp.all(jnp.isfinite(a)))
        except Exception as e:  # noqa: BLE001
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:200]}"
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def fmt(x, spec):
    return format(x, spec) if x is not None else format("-", ">" + spec.split(".")[0])


def print_table(rows, title):
    print(f"\n{title}")
    print(f"{'shape':<12}{'impl':<28}{'fwd ms':>9}{'TF/s':>7}{'f+b ms':>9}{'TF/s':>7}"
          f"{'err':>9}  note")
    for r in rows:
        print(f"{r['shape']:<12}{r['impl']:<28}{fmt(r.get('fwd_ms'), '9.3f')}"
              f"{fmt(r.get('fwd_tflops'), '7.0f')}{fmt(r.get('fwd_bwd_ms'), '9.3f')}"
              f"{fmt(r.get('fwd_bwd_tflops'), '7.0f')}{fmt(r.get('max_abs_err'), '9.1e')}  "
              f"{r.get('error', '')}")


def save(result, path, t_start):
    result["seconds"] = time.time() - t_start
    with open(path, "w") as f:
        json.dump(result, f, indent=1)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="attention_bench.json", help="JSON results path")
    p.add_argument("--small", action="store_true", help="tiny shapes (CPU: Pallas interpreter)")
    p.add_argument("--impls", default=",".join(IMPLS), help=f"subset of {','.join(IMPLS)}")
    p.add_argument("--shapes", default="vit,llm_causal,llm_packed")
    p.add_argument("--sweep", action="store_true", help="also sweep our GPU block sizes")
    p.add_argument("--check", action="store_true", help="also check ours vs dense (+grads)")
    p.add_argument("--iters", type=int, default=None, help="timed samples (median)")
    p.add_argument("--inner", type=int, default=None, help="calls per sample")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--verbose", action="store_true", help="print tracebacks")
    args = p.parse_args(argv)
    platform = dispatch.target_platform()
    small = args.small or platform == "cpu"
    args.iters = args.iters or (3 if small and platform == "cpu" else 10)
    args.inner = args.inner or (1 if platform == "cpu" else 5)
    impls = [i.strip() for i in args.impls.split(",") if i.strip()]
    for i in impls:
        if i not in IMPLS:
            p.error(f"unknown impl {i!r}; choose from {IMPLS}")
    names = set(args.shapes.split(","))
    shapes = [s for s in (SMALL if small else FULL) if s.name in names]
    device = jax.devices()[0]
    result = {"platform": platform, "device": getattr(device, "device_kind", str(device)),
              "jax": jax.__version__, "small": small, "dtype": "bfloat16", "rows": [],
              "sweep": [], "check": []}
    print(f"attention benchmark on {result['device']} ({platform}), jax {jax.__version__}",
          flush=True)
    if args.sweep and platform != "gpu":
        print("--sweep tunes the GPU kernel only; skipped on", platform, flush=True)
    t_start = time.time()
    if args.check:
        result["check"] = check_rows()
    for shape in shapes:
        inputs = make_inputs(shape, jnp.bfloat16)
        reference = None
        try:
            q, k, v, seg, _ = inputs
            ref_fn = jax.jit(attention_fn("xla", shape.causal, platform))
            reference = ref_fn(q, k, v, seg).astype(jnp.float32)
        except Exception as e:  # noqa: BLE001
            print(f"reference failed for {shape.name}: {e}", flush=True)
        for impl in impls:
            if impl == "cudnn" and shape.segments:
                row = {"shape": shape.name, "impl": impl,
                       "error": "n/a: cuDNN cannot keep packed segments apart"}
            elif impl == "cudnn" and platform != "gpu":
                row = {"shape": shape.name, "impl": impl, "error": "n/a: needs a GPU"}
            else:
                row = measure(impl, shape, inputs, platform=platform, args=args,
                              reference=reference)
            result["rows"].append(row)
            print(json.dumps(row), flush=True)
        if args.sweep and platform == "gpu":
            for kind, label, bs in sweep_configs():
                row = measure("ours", shape, inputs, platform=platform, args=args,
                              block_sizes=bs, reference=reference,
                              modes=("fwd",) if kind == "fwd" else ("fwd_bwd",))
                row["impl"] = label
                row["config"] = dataclasses.asdict(bs)
                result["sweep"].append(row)
                print(json.dumps(row), flush=True)
        del inputs, reference
        save(result, args.out, t_start)  # partial results survive a later crash or timeout
    save(result, args.out, t_start)
    print_table(result["rows"], "attention, bf16 (ms: median per call; err: max |diff| / "
                                "max |ref| of the forward output vs xla)")
    if result["sweep"]:
        print_table(result["sweep"], "sweep of our GPU kernel (fwd:bq/bk/warps/stages, "
                                     "bwd:bq_dkv/bk_dkv/bq_dq/bk_dq/warps/stages)")
    if result["check"]:
        print("\ncheck (relative L2 error vs dense):")
        for r in result["check"]:
            print("  ", r)
    print(f"\nwrote {args.out} in {result['seconds']:.0f} s")


if __name__ == "__main__":
    main()
