"""The TPU flash kernel compiles for a real TPU target (v5e 2x2) from this CPU-only machine.

libtpu compiles ahead of time for a described topology: the model's attention shapes go
through `dispatch.attention(impl="auto")` under a mesh of the topology's devices, so dispatch
must pick the Mosaic kernel from the mesh's platform and wrap it in shard_map; forward and
backward are lowered and compiled, which runs Mosaic's own checks (layouts, VMEM budget).
Skipped only where libtpu is not installed.
"""

import importlib.util
import os
import re
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from mini_internvl_jax.kernels import AttentionMask, dispatch

if importlib.util.find_spec("libtpu") is None:
    pytest.skip("libtpu is not installed: no TPU compiler", allow_module_level=True)
# Compile-only use: let several test processes (pytest -n) load libtpu without its lockfile.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


@pytest.fixture(scope="module")
def tpu_mesh():
    from jax.experimental import topologies

    topo = topologies.get_topology_desc(topology_name="v5e:2x2", platform="tpu")
    devices = np.array(topo.devices).reshape(2, 1, 2)
    return Mesh(devices, ("data", "fsdp", "tensor"))


SHAPES = [
    # name, batch, seq, heads, kv heads, head dim, causal, segments, dtype
    ("vit", 4, 1025, 16, 16, 64, False, False, jnp.bfloat16),
    ("llm", 2, 4096, 14, 2, 64, True, True, jnp.bfloat16),
    ("d96-f32", 2, 384, 4, 2, 96, True, True, jnp.float32),
    ("d128", 2, 512, 16, 8, 128, True, False, jnp.bfloat16),
    # the kernel's own blocks at their largest: [256, 2048], within v5e's default 16 MiB
    # scoped VMEM (float32 too, below: its compile alone takes ~15 s)
    ("auto-d128-2048", 2, 2048, 4, 2, 128, False, False, jnp.bfloat16),
]
CASES = [pytest.param(*x, id=x[0]) for x in SHAPES] + [pytest.param(
    "auto-f32-d128-2048", 2, 2048, 4, 2, 128, False, False, jnp.float32,
    id="auto-f32-d128-2048", marks=pytest.mark.slow)]


@pytest.mark.parametrize("name,b,s,h,kvh,d,causal,seg,dtype", CASES)
def test_forward_backward_compiles_for_tpu(tpu_mesh, name, b, s, h, kvh, d, causal, seg,
                                           dtype):
    def loss(q, k, v, segment_ids):
        mask = AttentionMask(causal, segment_ids if seg else None)
        out = dispatch.attention(q, k, v, mask, impl="auto")
        return jnp.sum(out.astype(jnp.float32))

    act = NamedSharding(tpu_mesh, P(("data", "fsdp"), None, "tensor", None))
    args = (jax.ShapeDtypeStruct((b, s, h, d), dtype, sharding=act),
            jax.ShapeDtypeStruct((b, s, kvh, d), dtype, sharding=act),
            jax.ShapeDtypeStruct((b, s, kvh, d), dtype, sharding=act),
            jax.ShapeDtypeStruct((b, s), jnp.int32,
                                 sharding=NamedSharding(tpu_mesh, P(("data", "fsdp"), None))))
    t0 = time.perf_counter()
    with jax.set_mesh(tpu_mesh):
        compiled = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2))).lower(*args).compile()
    seconds = time.perf_counter() - t0
    hlo = compiled.as_text()
    # forward and the fused backward: two Mosaic kernels, not the dense fallback
    assert hlo.count('custom_call_target="tpu_custom_call"') == 2, name
    if name == "d128":
        # The kernels carry cost estimates the step anatomy counts: at 512 tokens one 512 x 512
        # block pair per head; per chip 1 row and 8 heads (mesh data 2 x tensor 2); matmuls
        # of 2 * 512 * 512 * 128 FLOPs: 2 forward, 5 in the fused backward.
        from mini_internvl_jax.tools.hlo import analyze

        kernels = [k for k in analyze(hlo).kernels if k.instr.opcode == "custom-call"
                   and "tpu_custom_call" in k.instr.attrs]
        assert sorted(k.flops for k in kernels) == [
            n * 8 * 2 * 512 * 512 * 128 for n in (2, 5)]
    if name == "vit":
        # 1025 tokens: the forward's inner block is the whole 1152-padded sequence, so per chip
        # (2 rows, 8 heads) it copies Q, K, V and O once ([1152, 64] bf16 per head) plus lse
        # and the 3 x 4 int32 block table; with 128-blocks it re-read K/V 9 times.
        fwd = next(line for line in hlo.splitlines() if "%flash_fwd" in line
                   and "tpu_custom_call" in line)
        moved = int(re.search(r'"bytes_accessed"\s*:\s*"?(\d+)', fwd).group(1))
        assert moved == 2 * 8 * (4 * 1152 * 64 * 2 + 1152 * 4) + 3 * 4 * 4
    print(f"{name}: lowered + compiled for v5e:2x2 in {seconds:.1f} s")
