"""Reading a compiled step's optimized HLO text: FLOPs, bytes, collectives, converts, and where
they go. The one HLO reader of the project: the step anatomy (benchmarks/step_anatomy.py) and
the trainer's `--aot-tpu` sizing (train/aot.py) both use it.

XLA's `cost_analysis()` counts the body of a `while` loop once, so for a step whose layers run
under `lax.scan` it under-reports FLOPs and bytes by about the layer count. This module walks the
HLO call graph instead and weights every computation by how often it runs (a while body by its
trip count: XLA's `known_trip_count`, else the `i < N` bound of its condition), which makes a
scanned step comparable with an unrolled one and with the model's own FLOP count.

Conventions, chosen to match XLA's HloCostAnalysis where it matters:
  * FLOPs: 2 per multiply-add of every `dot` and `convolution`, wherever it sits (fusions
    included); elementwise work is not counted (it is bandwidth, not compute). A custom call
    that computes (a Pallas / Mosaic kernel) contributes the FLOPs of the cost estimate it
    carries; one without an estimate is an error, not a silent zero (runtime helpers such as
    TPU's async-collective or buffer-allocation calls compute nothing and are listed).
  * bytes: for every kernel (an instruction of a sequential computation: entry, loop bodies,
    branches), the bytes of its operands and results; for a Pallas kernel, the bytes of its cost
    estimate (the blocks its pipeline copies: a block read again for each grid step that
    changes its index, e.g. K/V once per query block). Inside a fusion, an operand that is only
    sliced (`dynamic-slice`, `slice`, `gather`) counts the slice, and a result written in place
    by `dynamic-update-slice` counts the update, as XLA does: a scan body reading layer i of a
    stacked weight reads one layer, not all of them.
  * collectives: all-gather, reduce-scatter, all-reduce, all-to-all, collective-permute (and
    their -start forms), deduplicated by channel id (TPU clones one collective into its async
    start/done pieces); bytes are the full (gathered / pre-scatter) buffer. TPU writes a
    reduce-scatter as a custom fusion around an `all-reduce` whose result the fusion only
    slices (`all-reduce-scatter`); that all-reduce is counted as the reduce-scatter it is.
  * categories: every kernel falls in exactly one (`CATEGORIES`), so the table sums to the
    total. The part comes from the named scopes the model and the step put around their parts
    (models/stack.py), the phase from JAX's name stack (`transpose(...)` = backward,
    `rematted_computation` = recomputation under remat); a kernel XLA made up without metadata
    (a layout copy, a fusion of its own) takes the name of its fused instructions or of the
    loop it runs in. Collectives and pure data movement (copies, transposes, slices, padding,
    in-place updates) are categories of their own, whatever part they serve.
"""

from __future__ import annotations

import math
import re
from collections import Counter, defaultdict
from dataclasses import dataclass, field

import numpy as np

from mini_internvl_jax.models.stack import (
    SCOPE_CAST,
    SCOPE_EMBED,
    SCOPE_HEAD,
    SCOPE_LLM,
    SCOPE_OPTIMIZER,
    SCOPE_VISION,
)

# bf16 dense peak FLOP/s and HBM bandwidth per chip (Google Cloud TPU documentation).
CHIPS = {"v5e": (197e12, 819e9), "v5p": (459e12, 2765e9), "v6e": (918e12, 1640e9)}

DTYPE_BYTES = {
    "pred": 1, "s2": 0.25, "u2": 0.25, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "s16": 2,
    "u16": 2, "s32": 4, "u32": 4, "s64": 8, "u64": 8, "f16": 2, "bf16": 2, "f32": 4, "f64": 8,
    "c64": 8, "c128": 16, "f8e4m3fn": 1, "f8e5m2": 1, "f8e4m3fnuz": 1, "f8e5m2fnuz": 1,
    "f8e4m3b11fnuz": 1, "f8e4m3": 1, "f8e3m4": 1, "f4e2m1fn": 0.5, "f8e8m0fnu": 1,
    "token": 0,
}
COLLECTIVES = {
    "all-gather": "all-gather", "all-gather-start": "all-gather",
    "reduce-scatter": "reduce-scatter", "all-reduce": "all-reduce",
    "all-reduce-start": "all-reduce", "all-to-all": "all-to-all",
    "collective-permute": "collective-permute", "collective-permute-start": "collective-permute",
}
# Instructions that move no data of their own (views, control flow whose bodies are counted).
FREE = {"parameter", "constant", "get-tuple-element", "tuple", "bitcast", "while",
        "conditional", "call", "after-all", "partition-id", "replica-id", "opt-barrier",
        "all-gather-done", "all-reduce-done", "collective-permute-done", "copy-done",
        "send-done", "recv-done", "async-done", "add-dependency", "domain", "slice-done"}
# Custom calls that are views: TPU's ConcatBitcast joins slices that already sit side by side.
VIEW_TARGETS = {"ConcatBitcast"}
SLICERS = {"dynamic-slice", "slice", "gather"}
_ARRAY = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\]")
_NAME = re.compile(r"%([\w.\-]+)")
_CALLS = re.compile(r"\b(calls|to_apply|body|condition|branch_computations|true_computation|"
                    r"false_computation|called_computations)=(\{[^}]*\}|%[\w.\-]+)")


def arrays(shape: str) -> list[tuple[str, tuple[int, ...]]]:
    """(dtype, dims) of every array in an HLO shape string (tuples flattened, layouts ignored)."""
    shape = re.sub(r"\{[^{}]*\}", "", shape)  # layouts such as {1,0:T(8,128)}
    return [(d, tuple(int(x) for x in dims.split(",") if x)) for d, dims in _ARRAY.findall(shape)
            if d in DTYPE_BYTES]


def nbytes(shape: str) -> float:
    total = 0.0
    for dtype, dims in arrays(shape):
        n = 1
        for x in dims:
            n *= x
        total += n * DTYPE_BYTES[dtype]
    return total


_ARRAY_LAYOUT = re.compile(r"\b([a-z][a-z0-9]*)\[([0-9,]*)\](\{[^{}]*(?:\([^)]*\)[^{}]*)*\})?")
# TPU memory spaces other than HBM (0) that a layout may name: S(1) VMEM, S(2)/S(4)/S(6)
# scalar and semaphore memories. Host memory (S(5)) is off chip and counts as HBM traffic.
ON_CHIP_SPACES = {"1", "2", "3", "4", "6"}


def hbm_bytes(shape: str) -> float:
    """Bytes of the arrays of an HLO shape that live in HBM (or host memory): an array whose
    layout puts it in on-chip memory (`{...S(1)}`, VMEM on TPU) moves no HBM bytes."""
    total = 0.0
    for dtype, dims, layout in _ARRAY_LAYOUT.findall(shape):
        if dtype not in DTYPE_BYTES:
            continue
        space = re.search(r"S\((\d+)\)", layout or "")
        if space and space.group(1) in ON_CHIP_SPACES:
            continue
        total += _prod(int(x) for x in dims.split(",") if x) * DTYPE_BYTES[dtype]
    return total


def _prod(xs) -> int:
    n = 1
    for x in xs:
        n *= x
    return n


def _matching(text: str, start: int) -> int:
    """Index just past the bracket group opening at text[start]."""
    depth, pairs = 0, {"(": ")", "{": "}", "[": "]"}
    close = set(pairs.values())
    for i in range(start, len(text)):
        c = text[i]
        if c in pairs:
            depth += 1
        elif c in close:
            depth -= 1
            if depth == 0:
                return i + 1
    raise ValueError(f"unbalanced brackets in HLO line: {text[:200]}")


@dataclass
class Instr:
    name: str
    shape: str
    opcode: str
    operands: list[str]
    args: str  # the raw text between the opcode's parentheses (a constant's value)
    attrs: str
    computation: str
    root: bool = False

    @property
    def op_name(self) -> str:
        m = re.search(r'op_name="([^"]*)"', self.attrs)
        return m.group(1) if m else ""

    def callees(self) -> list[tuple[str, str]]:
        out = []
        for key, val in _CALLS.findall(self.attrs):
            out += [(key, n) for n in _NAME.findall(val)]
        return out


@dataclass
class Computation:
    name: str
    instrs: list[Instr] = field(default_factory=list)
    entry: bool = False

    def by_name(self) -> dict[str, Instr]:
        return {i.name: i for i in self.instrs}


def parse_instr(line: str, computation: str) -> Instr | None:
    m = re.match(r"\s*(ROOT\s+)?%?([\w.\-]+)\s*=\s*", line)
    if not m:
        return None
    pos = m.end()
    if line[pos] == "(":
        end = _matching(line, pos)
    else:
        end = line.index(" ", pos)
        if "{" in line[pos:end] and not line[pos:end].endswith("}"):  # layout with spaces
            end = _matching(line, line.index("{", pos))
    shape = line[pos:end]
    rest = line[end:].lstrip()
    om = re.match(r"([\w\-]+)\(", rest)
    if not om:
        return None
    close = _matching(rest, om.end() - 1)
    operands = _NAME.findall(rest[om.end():close - 1])
    return Instr(m.group(2), shape, om.group(1), operands, rest[om.end():close - 1],
                 rest[close:], computation,
                 root=bool(m.group(1)))


def parse_module(text: str) -> dict[str, Computation]:
    comps: dict[str, Computation] = {}
    cur = None
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith(("HloModule", "//", "#")):
            continue
        if not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split()
            entry = head[0] == "ENTRY"
            name = head[1 if entry else 0].lstrip("%")
            cur = comps[name] = Computation(name, entry=entry)
            continue
        if line.strip() == "}":
            cur = None
            continue
        if cur is not None:
            ins = parse_instr(line, cur.name)
            if ins is not None:
                cur.instrs.append(ins)
    if not any(c.entry for c in comps.values()):
        raise ValueError("no ENTRY computation in the HLO text (pass compiled.as_text())")
    return comps


def _root(c: Computation) -> Instr | None:
    return next((i for i in c.instrs if i.root), None)


def _int_constant(name: str, comp: Computation, comps: dict[str, Computation],
                  outer: tuple[Instr, Computation] | None) -> int | None:
    """The integer value of `name` in `comp`: a constant, or (inside a fusion) the fusion's
    operand that a parameter stands for."""
    ins = comp.by_name().get(name)
    if ins is None:
        return None
    if ins.opcode == "constant" and re.fullmatch(r"-?\d+", ins.args.strip()):
        return int(ins.args)
    if ins.opcode == "parameter" and outer is not None:
        fusion, parent = outer
        k = int(ins.args)
        if k < len(fusion.operands):
            return _int_constant(fusion.operands[k], parent, comps, None)
    return None


def trip_count(loop: Instr, comps: dict[str, Computation]) -> int | None:
    """Iterations of a while loop: XLA's annotation, else N of a `counter < N` condition
    (JAX's scan and fori_loop count from 0 in steps of 1)."""
    m = re.search(r'known_trip_count"?\s*:\s*\{\s*"?n"?\s*:\s*"?(\d+)', loop.attrs)
    if m:
        return int(m.group(1))
    cond = comps.get(dict(loop.callees()).get("condition", ""))
    if cond is None:
        return None
    comp, root, outer = cond, _root(cond), None
    if root is not None and root.opcode == "fusion":
        inner = comps.get(dict(root.callees()).get("calls", ""))
        if inner is None:
            return None
        outer, comp, root = (root, cond), inner, _root(inner)
    if root is None or root.opcode != "compare" or len(root.operands) != 2:
        return None
    if "direction=LT" in root.attrs:
        return _int_constant(root.operands[1], comp, comps, outer)
    if "direction=GT" in root.attrs:
        return _int_constant(root.operands[0], comp, comps, outer)
    return None


@dataclass
class Kernel:
    """One top-level instruction of a sequential computation, and how often it runs."""

    instr: Instr
    calls: float
    flops: float   # per call
    bytes: float   # per call
    bytes_all: float = 0.0  # per call, counting on-chip memory (VMEM) operands and results too
    op_name: str = ""  # its metadata, else its fused instructions', else its loop's
    named_by: str = ""  # "metadata" | "fused ops" | "loop" | "" (nothing to go by)
    part: str = ""  # "vit" | "llm" | "embed_head_loss" | "optimizer" | "weight_cast" | ""
    category: str = ""  # one of CATEGORIES


@dataclass
class Anatomy:
    flops: float
    bytes: float  # HBM (and host) bytes read and written by the kernels
    kernels: list[Kernel]
    collectives: dict[str, dict[str, float]]
    weight_converts: dict[str, float]
    matmul_flops_by_dtype: dict[str, float]  # "bf16" / "f32" / "f32xbf16" (operand dtypes)
    loops: list[dict]
    unknown_trip_counts: int
    bytes_all_spaces: float = 0.0  # the same, counting arrays in on-chip memory too

    def categories(self, chips=CHIPS) -> dict[str, dict]:
        """Per category: kernels, executions, GFLOP and GB per step, the per-kernel roofline
        seconds on each chip, and the three largest kernels by bytes. Sums to the totals."""
        out: dict[str, dict] = {}
        for cat in CATEGORIES:
            ks = [k for k in self.kernels if k.category == cat]
            top = sorted(ks, key=lambda k: -k.calls * k.bytes)[:3]
            out[cat] = {
                "kernels": len(ks), "calls": sum(k.calls for k in ks),
                "gflop": sum(k.calls * k.flops for k in ks) / 1e9,
                "gb": sum(k.calls * k.bytes for k in ks) / 1e9,
                "per_kernel_s": {c: kernel_seconds(ks, peak, bw)
                                 for c, (peak, bw) in chips.items()},
                "top": [{"name": k.instr.name, "opcode": k.instr.opcode, "part": k.part,
                         "named_by": k.named_by, "op_name": k.op_name[-140:],
                         "gb": k.calls * k.bytes / 1e9} for k in top]}
        return out

    def roofline(self, model_flops: float, chips=CHIPS) -> dict[str, dict[str, float]]:
        """Lower bounds of the step time per chip kind: `global_s` = max(FLOPs / peak, bytes /
        bandwidth) over the whole step, `per_kernel_s` = that bound summed kernel by kernel
        (nothing overlaps), `model_flops_s` = the model's own FLOPs at peak."""
        return {c: {"global_s": max(self.flops / peak, self.bytes / bw),
                    "per_kernel_s": kernel_seconds(self.kernels, peak, bw),
                    "model_flops_s": model_flops / peak} for c, (peak, bw) in chips.items()}


def kernel_seconds(kernels: list[Kernel], peak: float, bandwidth: float) -> float:
    return sum(k.calls * max(k.flops / peak, k.bytes / bandwidth) for k in kernels)


CATEGORIES = (
    "ViT forward", "ViT recompute", "ViT backward",
    "LLM layers forward", "LLM layers recompute", "LLM layers backward",
    "embedding + LM head + loss", "optimizer update", "weight casts", "collectives",
    "copies / layout", "other")
_PARTS = ((SCOPE_OPTIMIZER, "optimizer"), (SCOPE_CAST, "weight_cast"),
          (SCOPE_HEAD, "embed_head_loss"), (SCOPE_EMBED, "embed_head_loss"),
          (SCOPE_VISION, "vit"), (SCOPE_LLM, "llm"))
_PART_CATEGORY = {"embed_head_loss": "embedding + LM head + loss",
                  "optimizer": "optimizer update", "weight_cast": "weight casts"}
# Instructions that only move or view data: a kernel made of nothing else is a copy.
MOVEMENT = {"copy", "copy-start", "copy-done", "slice-start", "transpose", "reshape", "bitcast",
            "broadcast",
            "slice", "dynamic-slice", "dynamic-update-slice", "concatenate", "pad", "reverse",
            "parameter", "tuple", "get-tuple-element", "constant", "iota"}
_COLLECTIVE_OPS = set(COLLECTIVES) | {"reduce-scatter", "all-gather-done", "all-reduce-done",
                                      "collective-permute-done", "ragged-all-to-all"}


def _scope_re(scope: str) -> re.Pattern:
    return re.compile(r"(?:^|[/(])" + re.escape(scope) + r"(?:[)/]|$)")


_PART_RES = [(_scope_re(scope), part) for scope, part in _PARTS]


def part_of(op_name: str) -> str:
    return next((part for rx, part in _PART_RES if rx.search(op_name)), "")


def phase_of(op_name: str) -> str:
    if "rematted_computation" in op_name:
        return "recompute"
    return "backward" if "transpose(" in op_name else "forward"


def _inner_opcodes(name: str, comps: dict[str, Computation], seen=None) -> set[str]:
    """Opcodes of a fused computation and of the computations it calls."""
    seen = set() if seen is None else seen
    if name in seen or name not in comps:
        return set()
    seen.add(name)
    out = set()
    for i in comps[name].instrs:
        out.add(i.opcode)
        for _, callee in i.callees():
            out |= _inner_opcodes(callee, comps, seen)
    return out


def _fused_op_name(ins: Instr, comps: dict[str, Computation]) -> str:
    """The most common op_name among the instructions a fusion (or async wrapper) calls."""
    names: Counter = Counter()
    for _, callee in ins.callees():
        for i in comps.get(callee, Computation("")).instrs:
            if i.op_name:
                names[i.op_name] += 1
    return names.most_common(1)[0][0] if names else ""


def _copy_kind(ins: Instr) -> str:
    """What a copy XLA inserted does, from the memory spaces of its source and destination."""
    parts = _top_level(ins.shape)  # copy-start: (destination, source alias, context)
    if ins.opcode == "slice-start":  # ((source), destination, context)
        parts = [parts[1], parts[0]] if len(parts) > 1 else parts
    dst, src = parts[0], (parts[1] if len(parts) > 1 else "")
    on_chip = lambda x: bool(nbytes(x)) and not hbm_bytes(x)
    what = "slice" if ins.opcode == "slice-start" else "copy"
    if ins.opcode != "copy" and on_chip(src) and not on_chip(dst):
        return f"{what} from on-chip memory to HBM (eviction)"
    if ins.opcode != "copy" and on_chip(dst) and not on_chip(src):
        return f"{what} from HBM into on-chip memory (memory-space assignment prefetch)"
    return "layout change" if ins.opcode == "copy" else f"asynchronous {what}"


def classify(ins: Instr, comps: dict[str, Computation], loop_op_name: str
             ) -> tuple[str, str, str, str]:
    """(op_name, named_by, part, category) of one kernel."""
    op_name, named_by = ins.op_name, "metadata"
    if not op_name:
        op_name, named_by = _fused_op_name(ins, comps), "fused ops"
    if not op_name:
        op_name, named_by = loop_op_name, "loop" if loop_op_name else ""
    if named_by in ("loop", "") and ins.opcode in ("copy", "copy-start", "slice-start"):
        op_name += f" [XLA {ins.opcode}: {_copy_kind(ins)}]"
    part = part_of(op_name)
    inner = set().union(*(_inner_opcodes(c, comps) for _, c in ins.callees())) \
        if ins.opcode in ("fusion", "async-start") else set()
    if (ins.opcode in _COLLECTIVE_OPS or custom_call_target(ins).startswith("AsyncCollective")
            or (inner & _COLLECTIVE_OPS and not inner & {"dot", "convolution"})):
        return op_name, named_by, part, "collectives"
    if ins.opcode in MOVEMENT or (ins.opcode == "fusion" and inner <= MOVEMENT):
        return op_name, named_by, part, "copies / layout"
    if part in ("vit", "llm"):
        label = "ViT" if part == "vit" else "LLM layers"
        return op_name, named_by, part, f"{label} {phase_of(op_name)}"
    return op_name, named_by, part, _PART_CATEGORY.get(part, "other")


def _walk(comps: dict[str, Computation]):
    """(runs per step of every computation, the set of sequential computations,
    names of computations inside a while loop, loops, unknown trip counts, and the op_name of
    the innermost loop around each sequential computation)."""
    runs: dict[str, float] = defaultdict(float)
    sequential, in_loop = set(), set()
    context: dict[str, str] = {}
    loops, unknown = [], 0
    entry = next(c for c in comps.values() if c.entry)

    def visit(name: str, n: float, seq: bool, looped: bool, where: str, depth: int = 0):
        nonlocal unknown
        if name not in comps or depth > 200:
            return
        runs[name] += n
        if seq:
            sequential.add(name)
            context.setdefault(name, where)
        if looped:
            in_loop.add(name)
        for ins in comps[name].instrs:
            trips = 1
            if ins.opcode == "while":
                t = trip_count(ins, comps)
                unknown += t is None
                trips = 1 if t is None else t
                if seq:
                    loops.append({"name": ins.name, "op_name": ins.op_name, "trips": t,
                                  "runs": n})
            for key, callee in ins.callees():
                if ins.opcode == "while":
                    visit(callee, n * trips, seq, True, ins.op_name or where, depth + 1)
                elif ins.opcode in ("conditional", "call") or key == "branch_computations":
                    visit(callee, n, seq, looped, ins.op_name or where, depth + 1)
                else:  # fusions, reducers, async wrappers: part of the calling kernel
                    visit(callee, n, False, looped, where, depth + 1)

    visit(entry.name, 1.0, True, False, "")
    return runs, sequential, in_loop, loops, unknown, context


def dot_flops(ins: Instr, shapes: dict[str, str]) -> float:
    """2 x output elements x contracted elements, for dot and convolution."""
    out = arrays(ins.shape)
    if not out or len(ins.operands) < 2:
        return 0.0
    n_out = _prod(out[0][1])
    if ins.opcode == "dot":
        lhs = arrays(shapes.get(ins.operands[0], ""))
        m = re.search(r"lhs_contracting_dims=\{([0-9,]*)\}", ins.attrs)
        if not lhs or not m:
            return 0.0
        dims = [int(x) for x in m.group(1).split(",") if x]
        return 2.0 * n_out * _prod(lhs[0][1][d] for d in dims)
    if ins.opcode == "convolution":
        return _conv_flops(ins, shapes, out[0][1])
    return 0.0


def _window(attrs: str) -> dict[str, list[str]]:
    m = re.search(r"window=\{([^}]*)\}", attrs)
    out = {}
    for item in (m.group(1).split() if m else []):
        key, _, val = item.partition("=")
        out[key] = val.split("x")
    return out


def _conv_flops(ins: Instr, shapes: dict[str, str], out_dims: tuple[int, ...]) -> float:
    """2 x (output elements without spatial dims) x (valid (output, window) position pairs per
    spatial dim) x input features per group. TPU writes batched matmuls as convolutions with a
    dilated window whose taps mostly land in dilation holes; only real taps count."""
    lhs = arrays(shapes.get(ins.operands[0], ""))
    rhs = arrays(shapes.get(ins.operands[1], ""))
    m = re.search(r"dim_labels=([^_]*)_([^-]*)->(\S+?)(?:,|$)", ins.attrs)
    if not lhs or not rhs or not m:
        return 0.0
    lhs_l, rhs_l, out_l = m.group(1), m.group(2), m.group(3).rstrip(",")
    lhs_d, rhs_d = lhs[0][1], rhs[0][1]
    win = _window(ins.attrs)
    spatial = sorted(c for c in rhs_l if c.isdigit())
    non_spatial_out = _prod(out_dims[i] for i, c in enumerate(out_l) if not c.isdigit())
    total = 2.0 * non_spatial_out * rhs_d[rhs_l.index("i")]
    for j, c in enumerate(spatial):
        n_in, k = lhs_d[lhs_l.index(c)], rhs_d[rhs_l.index(c)]
        n_out = out_dims[out_l.index(c)]

        def get(key, default, j=j):
            vals = win.get(key)
            return vals[j] if vals and j < len(vals) else default

        stride, ld, rd = int(get("stride", 1)), int(get("lhs_dilate", 1)), int(get("rhs_dilate", 1))
        lo = int(get("pad", "0_0").split("_")[0])
        span = (n_in - 1) * ld
        pairs = 0
        for o in range(n_out):
            for t in range(k):
                q = o * stride + t * rd - lo
                pairs += 0 <= q <= span and q % ld == 0
        total *= pairs
    return total


# Custom-call targets that compute nothing: runtime helpers around collectives, buffers and
# indices. Any other custom call must say what it computes (its cost estimate).
NO_COMPUTE_TARGETS = {
    "AllocateBuffer", "AssumeGatherIndicesInBound", "AsyncCollectiveStart",
    "AsyncCollectiveDone", "GatherScatterIndicesBitpacked", "SliceId", "Sharding",
    "SPMDFullToShardShape", "SPMDShardToFullShape", "MoveToHost", "MoveToDevice",
    "PadToStatic", "SliceToDynamic", "PrepareAsyncCallStart", "PrepareAsyncCallDone",
    "xla_python_cpu_callback", "xla_ffi_python_cpu_callback", "annotate_device_placement",
} | VIEW_TARGETS
# Custom calls whose result is memory handed out, not written: TPU's AllocateBuffer stands for
# the zeros a scan's stacked outputs start from when every element is overwritten in the loop.
UNWRITTEN_TARGETS = {"AllocateBuffer"}
_TARGET = re.compile(r'custom_call_target="([^"]*)"')
_COST_FLOPS = re.compile(r'"cost_estimate"\s*:\s*\{[^{}]*"flops"\s*:\s*"?(\d+)')
_COST_BYTES = re.compile(r'"cost_estimate"\s*:\s*\{[^{}]*"bytes_accessed"\s*:\s*"?(\d+)')


def custom_call_target(ins: Instr) -> str:
    m = _TARGET.search(ins.attrs)
    return m.group(1) if m else ""


def _custom_call_flops(ins: Instr) -> float:
    """FLOPs of a custom call from the cost estimate in its backend config (a Pallas kernel's
    `pl.CostEstimate`); 0 for runtime helpers; an error for any other target without one."""
    m = _COST_FLOPS.search(ins.attrs)
    if m:
        return float(m.group(1))
    target = custom_call_target(ins)
    if target in NO_COMPUTE_TARGETS:
        return 0.0
    raise ValueError(f"custom call %{ins.name} (target {target!r}, {ins.op_name or 'no op_name'})"
                     " carries no cost estimate: its FLOPs are unknown. Give the kernel one "
                     "(pallas_call(..., cost_estimate=pl.CostEstimate(...))) or, if it computes "
                     "nothing, add its target to tools.hlo.NO_COMPUTE_TARGETS")


def _computation_flops(name: str, comps, memo) -> float:
    if name in memo:
        return memo[name]
    memo[name] = 0.0
    c = comps.get(name)
    if c is None:
        return 0.0
    shapes = {i.name: i.shape for i in c.instrs}
    total = 0.0
    for ins in c.instrs:
        total += _instr_flops(ins, shapes, comps, memo)
    memo[name] = total
    return total


def _instr_flops(ins: Instr, shapes, comps, memo) -> float:
    if ins.opcode in ("dot", "convolution"):
        return dot_flops(ins, shapes)
    if ins.opcode == "custom-call":
        return _custom_call_flops(ins)
    if ins.opcode in ("while", "conditional", "call"):
        return 0.0  # their bodies are kernels of their own
    return sum(_computation_flops(c, comps, memo) for _, c in ins.callees())


def _operand_bytes(ins: Instr, k: int, shapes: dict[str, str], comps, size=hbm_bytes) -> float:
    """Bytes a kernel reads of its k-th operand: only the slices when the fused computation
    only slices it, nothing when it is the buffer of an in-place dynamic-update-slice.
    `size`: how an array shape counts (`hbm_bytes`, or `nbytes` for every memory space)."""
    full = size(shapes.get(ins.operands[k], ""))
    if ins.opcode in SLICERS and k == 0:
        return min(full, nbytes(ins.shape))
    if ins.opcode == "slice-start":  # ((operand), slice, context): an asynchronous slice
        return min(full, nbytes(_top_level(ins.shape)[1]))
    if ins.opcode == "dynamic-update-slice" and k == 0:
        return 0.0
    if ins.opcode != "fusion":
        return full
    inner = comps.get(dict(ins.callees()).get("calls", ""))
    if inner is None:
        return full
    param = next((i for i in inner.instrs if i.opcode == "parameter"
                  and i.args.strip() == str(k)), None)
    if param is None:
        return full
    users = _users_through_bitcasts(inner, param.name)
    if users and all(u.opcode in SLICERS and u.operands[0] in _aliases(inner, param.name)
                     for u in users):
        return min(full, sum(nbytes(u.shape) for u in users))  # a slice of what it reads
    if users and all(u.opcode == "dynamic-update-slice" and u.operands[0]
                     in _aliases(inner, param.name) for u in users):
        return 0.0
    return full


def _aliases(comp: Computation, name: str) -> set[str]:
    out, frontier = {name}, [name]
    while frontier:
        n = frontier.pop()
        for i in comp.instrs:
            if i.opcode == "bitcast" and i.operands and i.operands[0] == n and i.name not in out:
                out.add(i.name)
                frontier.append(i.name)
    return out


def _users_through_bitcasts(comp: Computation, name: str) -> list[Instr]:
    names = _aliases(comp, name)
    return [i for i in comp.instrs if i.opcode != "bitcast" and set(i.operands) & names]


# Asynchronous starts return tuples holding their operands besides the output: the index of
# the output (copy-start: (destination, source, context); all-gather-start / collective-permute-
# start / async-start: (operands, output, ...)). all-reduce-start returns its outputs only.
ASYNC_RESULT = {"copy-start": 0, "all-gather-start": 1, "collective-permute-start": 1,
                "async-start": 1, "slice-start": 1}


def _result_bytes(ins: Instr, comps, size=hbm_bytes) -> float:
    """Bytes a kernel writes: the update of an in-place dynamic-update-slice, else its result
    (`size` as in `_operand_bytes`)."""
    if ins.opcode == "dynamic-update-slice":
        return 0.0 if not size(ins.shape) else nbytes(
            _shape_of(ins.operands[1], ins.computation, comps))
    if custom_call_target(ins) in UNWRITTEN_TARGETS:
        return 0.0
    if ins.opcode in ASYNC_RESULT:  # the tuple repeats the operands: only the output is new
        elems = _top_level(ins.shape)
        return size(elems[ASYNC_RESULT[ins.opcode]] if len(elems) > 1 else ins.shape)
    if ins.opcode != "fusion":
        return size(ins.shape)
    inner = comps.get(dict(ins.callees()).get("calls", ""))
    root = _root(inner) if inner else None
    if root is None or not size(ins.shape):
        return size(ins.shape)
    by = inner.by_name()
    parts: list[Instr | None] = ([by.get(n) for n in root.operands] if root.opcode == "tuple"
                                 else [root])
    outer = _top_level(ins.shape) if root.opcode == "tuple" else [ins.shape]
    if len(outer) != len(parts):
        outer = [q.shape if q is not None else "" for q in parts]
    total = 0.0
    for p, out in zip(parts, outer, strict=True):
        while p is not None and p.opcode == "bitcast":
            p = by.get(p.operands[0])
        if p is None or not size(out):  # the element lives in on-chip memory
            continue
        if p.opcode == "dynamic-update-slice":
            total += nbytes(by[p.operands[1]].shape) if p.operands[1] in by else 0.0
        else:
            total += size(out)
    return total


def _shape_of(name: str, computation: str, comps) -> str:
    ins = comps[computation].by_name().get(name)
    return ins.shape if ins else ""


def squeezed(dims) -> tuple[int, ...]:
    return tuple(d for d in dims if d != 1)


def merged_forms(dims) -> set[tuple[int, ...]]:
    """A shape and every shape made by merging neighbouring dims (how a compiler may view a
    [in, heads, head_dim] kernel: [in, heads*head_dim], ...), size-1 dims dropped."""
    dims = squeezed(dims)
    out = {dims}
    for i in range(len(dims) - 1):
        for m in merged_forms(dims[:i] + (dims[i] * dims[i + 1],) + dims[i + 2:]):
            out.add(m)
    return out


def _shape_key(shape: str) -> tuple[int, ...] | None:
    a = arrays(shape)
    return squeezed(a[0][1]) if len(a) == 1 else None


def _through(ins: Instr | None, by_name: dict[str, Instr], views) -> Instr | None:
    """`ins`, or what it is a view of (following the first operand through `views` ops)."""
    while ins is not None and ins.opcode in views and ins.operands:
        ins = by_name.get(ins.operands[0])
    return ins


def scattering_all_reduces(comps: dict[str, Computation]) -> set[tuple[str, str]]:
    """(computation, instruction) of every all-reduce that is a reduce-scatter: the all-reduce
    of a custom fusion (TPU's reduce-scatter emitter) whose outputs (its root, or the elements
    of a root tuple) all dynamic-slice its result, so each chip keeps only its own shard. An
    all-reduce whose result an ordinary kernel slices stays an all-reduce: the chips exchange
    the whole buffer."""
    fused = {callee for c in comps.values() for i in c.instrs
             if i.opcode == "fusion" and "kind=kCustom" in i.attrs
             for key, callee in i.callees() if key == "calls"}
    out = set()
    for name in fused & comps.keys():
        by_name = comps[name].by_name()
        root = next((i for i in comps[name].instrs if i.root), None)
        if root is None:
            continue
        outs = [by_name.get(o) for o in root.operands] if root.opcode == "tuple" else [root]
        sources = set()
        for o in outs:
            o = _through(o, by_name, ("bitcast", "copy", "reshape"))
            if o is None or o.opcode != "dynamic-slice" or not o.operands:
                break
            src = _through(by_name.get(o.operands[0]), by_name, ("bitcast", "get-tuple-element"))
            if src is None or src.opcode not in ("all-reduce", "all-reduce-start"):
                break
            sources.add(src.name)
        else:
            if len(sources) == 1:
                out.add((name, sources.pop()))
    return out


def analyze(text: str, weight_shapes: set | frozenset = frozenset()) -> Anatomy:
    """The anatomy of one compiled module (its `as_text()`). `weight_shapes`: shapes of the
    weights as a loop sees them (a layer's slice, whole or sharded; see `merged_forms`);
    float32 <-> bfloat16 converts of arrays of those shapes inside a loop are counted."""
    comps = parse_module(text)
    runs, sequential, in_loop, loops, unknown, context = _walk(comps)
    memo: dict[str, float] = {}
    kernels = []
    for name in sequential:
        c = comps[name]
        shapes = {i.name: i.shape for i in c.instrs}
        for ins in c.instrs:
            if ins.opcode in FREE or custom_call_target(ins) in VIEW_TARGETS:
                continue
            fl = _instr_flops(ins, shapes, comps, memo)
            by = sum(_operand_bytes(ins, k, shapes, comps) for k in range(len(ins.operands)))
            by += _result_bytes(ins, comps)
            every = sum(_operand_bytes(ins, k, shapes, comps, nbytes)
                        for k in range(len(ins.operands))) + _result_bytes(ins, comps, nbytes)
            estimate = _COST_BYTES.search(ins.attrs) if ins.opcode == "custom-call" else None
            if estimate:  # a kernel re-reading blocks moves more than its operands' size
                by = every = float(estimate.group(1))
            kernels.append(Kernel(ins, runs[name], fl, by, every,
                                  *classify(ins, comps, context.get(name, ""))))

    coll: dict[str, dict[str, float]] = {}
    seen: dict[str, tuple[str, float, float]] = {}
    converts: dict = {"count": 0.0, "bytes": 0.0}
    convert_sources: dict[str, float] = defaultdict(float)
    by_dtype: dict[str, float] = defaultdict(float)
    shapes_of = {n: {i.name: i.shape for i in c.instrs} for n, c in comps.items()}
    scattering = scattering_all_reduces(comps)
    for name, c in comps.items():
        n = runs.get(name, 0.0)
        if not n:
            continue
        for ins in c.instrs:
            if ins.opcode in ("dot", "convolution"):
                kinds = sorted({d for o in ins.operands[:2]
                                for d, _ in arrays(shapes_of[name].get(o, ""))[:1]})
                by_dtype["x".join(kinds)] += n * dot_flops(ins, shapes_of[name])
            kind = COLLECTIVES.get(ins.opcode)
            if kind == "all-reduce" and (name, ins.name) in scattering:
                kind = "reduce-scatter"
            if kind is not None:
                size = max(nbytes(ins.shape) if not ins.opcode.endswith("-start") else 0.0,
                           sum(nbytes(shapes_of[name].get(o, "")) for o in ins.operands))
                if kind == "all-gather" and ins.opcode == "all-gather-start":
                    size = max(size, nbytes(ins.shape) / 2)  # (operand, result) tuple
                cid = re.search(r"channel_id=(\d+)", ins.attrs)
                key = f"{kind}#{cid.group(1)}" if cid else f"{kind}@{name}/{ins.name}"
                prev = seen.get(key)
                if prev is None or n > prev[1]:
                    seen[key] = (kind, n, size)
            if (ins.opcode == "convert" and name in in_loop and ins.operands
                    and _shape_key(ins.shape) in weight_shapes):
                src = arrays(shapes_of[name].get(ins.operands[0], ""))
                dst = arrays(ins.shape)
                if src and dst and {src[0][0], dst[0][0]} == {"f32", "bf16"}:
                    converts["count"] += n
                    convert_sources[f"{src[0][0]}->{dst[0][0]} {ins.op_name}"] += n
                    converts["bytes"] += n * (nbytes(ins.shape)
                                              + nbytes(shapes_of[name][ins.operands[0]]))
    converts["top_sources"] = dict(sorted(convert_sources.items(), key=lambda kv: -kv[1])[:8])
    for kind, n, size in seen.values():
        d = coll.setdefault(kind, {"count": 0.0, "bytes": 0.0, "ops": 0})
        d["count"] += n
        d["bytes"] += n * size
        d["ops"] += 1
    flops = sum(k.calls * k.flops for k in kernels)
    total_bytes = sum(k.calls * k.bytes for k in kernels)
    return Anatomy(flops, total_bytes, kernels, coll, converts, dict(by_dtype), loops, unknown,
                   sum(k.calls * k.bytes_all for k in kernels))


# --- collective traffic inside and across slices (the `--aot-tpu --num-slices` report) -------

_IOTA_RE = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")
_TRAFFIC_OPS = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "ragged-all-to-all")


def parse_groups(attrs: str, n_devices: int) -> list[list[int]]:
    """Device groups of a collective from its attributes: `replica_groups={{0,1},{2,3}}`, the
    iota form `replica_groups=[2,4]<=[4,2]T(1,0)`, `{}` (all devices) or a permute's
    `source_target_pairs`."""
    for key in ("replica_groups=", "source_target_pairs="):
        i = attrs.find(key)
        if i < 0:
            continue
        i += len(key)
        if attrs[i] == "[":
            m = _IOTA_RE.match(attrs, i)
            if m is None:
                raise ValueError(f"unreadable replica groups in HLO: {attrs[i:i + 60]!r}")
            shape = [int(x) for x in m.group(1).split(",")]
            dims = [int(x) for x in m.group(2).split(",")]
            ids = np.arange(math.prod(dims)).reshape(dims)
            if m.group(3):
                ids = ids.transpose([int(x) for x in m.group(3).split(",")])
            return ids.reshape(shape).tolist()
        body = attrs[i:_matching(attrs, i)]
        groups = [[int(x) for x in g.split(",") if x.strip()]
                  for g in re.findall(r"\{([\d,\s]*)\}", body[1:-1])]
        groups = [g for g in groups if g]
        return groups or [list(range(n_devices))]
    return [list(range(n_devices))]


def _top_level(shape_text: str) -> list[str]:
    """Elements of a tuple shape `(a, (b, c), d)` (or the one array shape)."""
    shape_text = shape_text.strip()
    if not shape_text.startswith("("):
        return [shape_text]
    parts, depth, begin = [], 0, 1
    for i, ch in enumerate(shape_text):
        depth += ch in "({["
        depth -= ch in ")}]"
        if (ch == "," and depth == 1) or (depth == 0 and ch == ")"):
            parts.append(shape_text[begin:i])
            begin = i + 1
    return parts


def _traffic_bytes(op: str, is_start: bool, result: str, group: int) -> float:
    """What one chip sends or assembles: an all-reduce's buffer, an all-gather's gathered
    output, a reduce-scatter's input (its output x group size). Async starts return (input,
    output, context...) tuples, except all-reduce-start, which returns its outputs."""
    if is_start and op != "all-reduce":
        size = max(nbytes(part) for part in _top_level(result))
    else:
        size = nbytes(result)
    return size * group if op == "reduce-scatter" else size


def collective_traffic(hlo: str, slice_of: list[int]) -> dict:
    """Bytes each chip moves through collectives per step, split into traffic inside a slice
    (ICI) and across slices (DCN); loop bodies count times their trip counts.

    A TPU multislice executable is compiled per slice (`num_partitions` = chips per slice):
    its replica groups index the chips of one slice, and everything that crosses slices is a
    send to the megascale runtime (DCN all-reduce / all-gather / one-to-one transfers). In a
    program over all devices, a collective crosses slices when one of its device groups does.
    `slice_of[d]`: the slice of logical device d.
    """
    comps = parse_module(hlo)
    runs = _walk(comps)[0]
    head = re.search(r"num_partitions=(\d+)", hlo.lstrip().split("\n", 1)[0])
    per_slice_program = head is not None and int(head.group(1)) < len(slice_of)
    ici = 0.0
    dcn: dict[str, float] = {}  # kind -> bytes
    dcn_ops = 0

    def add_dcn(kind: str, size: float) -> None:
        nonlocal dcn_ops
        dcn_ops += 1
        dcn[kind] = dcn.get(kind, 0) + size

    for name, comp in comps.items():
        times = runs.get(name, 0)
        for ins in comp.instrs if times else ():
            if ins.opcode == "send" and "xla_megascale_runtime" in ins.attrs:
                kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', ins.attrs)
                add_dcn("dcn-" + (kind.group(1).lower() if kind else "transfer"),
                        nbytes(_top_level(ins.shape)[0]) * times)
                continue
            is_start = ins.opcode.endswith("-start")
            op = ins.opcode.removesuffix("-start")
            if op not in _TRAFFIC_OPS:
                continue
            groups = parse_groups(ins.attrs, len(slice_of))
            size = _traffic_bytes(op, is_start, ins.shape, len(groups[0])) * times
            if not per_slice_program and any(len({slice_of[d] for d in g}) > 1
                                             for g in groups):
                add_dcn(op, size)
            else:
                ici += size
    return {"ici_collective_bytes": ici, "dcn_collective_bytes": sum(dcn.values()),
            "dcn_collective_ops": dcn_ops, "dcn_bytes_by_op": dcn}
