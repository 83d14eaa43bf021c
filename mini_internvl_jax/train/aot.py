"""Compile the full training step for a TPU topology on any machine with libtpu installed.

`mivl-train --config ... --aot-tpu v5e:2x2` builds the mesh over the topology's
compile-only devices, lowers the jitted step on abstract arguments (nothing is allocated) and
compiles it, then reports XLA's per-chip memory analysis and FLOPs: the way to size a pod
before paying for it. `--num-slices 2` compiles for two such slices joined by the data-centre
network (DCN) and adds the bytes each chip sends through collectives that cross slices, read
from the compiled HLO: the traffic that DCN bandwidth, not ICI, has to carry.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re

import jax
import numpy as np

from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.sharding import make_mesh
from mini_internvl_jax.train import flops
from mini_internvl_jax.train.config import DcnConfig, TrainConfig, build_model_config
from mini_internvl_jax.train.setup import build_abstract

GIB = 2.0**30
MIB = 2.0**20


_TOPOLOGY = re.compile(r"v\d+[a-z]*:\d+(?:x\d+){1,2}")


def topology_devices(topology: str, num_slices: int = 1):
    """Compile-only devices of `num_slices` slices of a TPU topology such as `v5e:2x2`, `v5e:2x4`
    or `v5p:2x2x1` (each device knows its `slice_index`)."""
    if not _TOPOLOGY.fullmatch(topology):  # before libtpu, which warns at length first
        raise ConfigError(f"--aot-tpu {topology!r} is not a TPU topology; names look like "
                          "v5e:2x2, v6e:4x4 or v5p:2x2x1 (generation:chips per dimension)")
    # Compile-only: no metadata server to ask, and other processes may hold libtpu too.
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    from jax.experimental import topologies

    try:
        return topologies.get_topology_desc(topology, "tpu", num_slices=num_slices).devices
    except Exception as e:  # libtpu missing, or a topology string it does not know
        hint = ("libtpu does not know this topology" if importlib.util.find_spec("libtpu")
                else "needs libtpu: `pip install jax[tpu]`")
        raise RuntimeError(f"cannot describe TPU topology {topology!r} ({hint}; names look "
                           f"like v5e:2x2, v5p:2x2x1): {str(e).splitlines()[0][:200]}") from e


def per_device_bytes(tree) -> int:
    """Bytes one device holds of a tree of sharded ShapeDtypeStructs (largest shard)."""
    total = 0
    for x in jax.tree.leaves(tree):
        shape = x.sharding.shard_shape(x.shape)
        total += math.prod(shape) * np.dtype(x.dtype).itemsize
    return total


def dcn_for(cfg: TrainConfig, num_slices: int) -> DcnConfig:
    """`cfg.mesh.dcn`, or data parallel over the slices when the config names no DCN split."""
    if num_slices < 1:
        raise ConfigError(f"--num-slices must be >= 1, got {num_slices}")
    dcn = cfg.mesh.dcn
    if dcn.slices == 1:
        return DcnConfig(data=num_slices)
    if dcn.slices != num_slices:
        raise ConfigError(f"mesh.dcn (data={dcn.data}, fsdp={dcn.fsdp}) spans {dcn.slices} "
                          f"slices but --num-slices is {num_slices}")
    return dcn


def compile_for_topology(cfg: TrainConfig, topology: str, num_slices: int = 1) -> dict:
    dcn = dcn_for(cfg, num_slices)
    devices = topology_devices(topology, num_slices)
    model_cfg = build_model_config(cfg)
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices, dcn=dcn.sizes)
    except ValueError as e:  # sizes that do not split the topology's chips: a config mistake
        raise ConfigError(f"mesh: {e} (--aot-tpu {topology} x {num_slices} slice(s): "
                          f"{len(devices)} chips)") from None
    s = build_abstract(cfg, mesh, model_cfg)
    batch = s.batch_abstract()
    with jax.set_mesh(mesh):
        compiled = s.step_fn.lower(s.state, s.frozen, s.rest, batch).compile()
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tiles = cfg.max_tiles * cfg.optim.grad_accum
    model_flops = flops.step_flops(model_cfg, batch=cfg.batch_size, seq_len=cfg.seq_len,
                                   tiles=tiles, trainable=frozenset(flops.PARTS)
                                   - cfg.frozen_components)
    traffic = collective_traffic(compiled.as_text(), slice_of_logical_device(mesh))
    return {
        "topology": topology, "num_slices": num_slices, "chips": len(devices),
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "dcn": dict(zip(mesh.axis_names, dcn.sizes, strict=True)),
        "model": model_cfg.name, "stage": cfg.stage,
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "tiles_per_step": tiles,
        "grad_accum": cfg.optim.grad_accum, "remat": cfg.compute.remat,
        "dtype": cfg.compute.dtype, "param_dtype": cfg.compute.param_dtype,
        "trainable_gib": per_device_bytes(s.state.params) / GIB,
        "frozen_gib": per_device_bytes(s.frozen) / GIB,
        "optimizer_gib": per_device_bytes(s.state.opt_state) / GIB,
        # MPO: the reference model's own parameters (None: log-probs precomputed)
        "reference": (None if cfg.preference is None else cfg.preference.reference),
        "reference_gib": per_device_bytes(getattr(s.step_fn, "ref", None)) / GIB,
        "batch_gib": per_device_bytes(batch) / GIB,
        "arguments_gib": mem.argument_size_in_bytes / GIB,
        "outputs_gib": mem.output_size_in_bytes / GIB,
        "aliased_gib": mem.alias_size_in_bytes / GIB,
        "temporaries_gib": mem.temp_size_in_bytes / GIB,
        "code_gib": mem.generated_code_size_in_bytes / GIB,
        "peak_gib": (mem.argument_size_in_bytes + mem.output_size_in_bytes
                     - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                     + mem.generated_code_size_in_bytes) / GIB,
        "xla_flops_per_chip": float(cost.get("flops", float("nan"))),
        "model_flops_per_step": model_flops,
        **traffic,
    }


def format_report(r: dict) -> str:
    slices = f"{r['num_slices']} slices of " if r["num_slices"] > 1 else ""
    lines = [
        f"AOT compile of the training step for TPU {slices}{r['topology']} ({r['chips']} x "
        f"{r['device_kind']}), mesh {r['mesh']}"
        + (f" (across slices: {r['dcn']})" if r["num_slices"] > 1 else ""),
        f"model {r['model']}, stage {r['stage']}, batch {r['batch_size']} x {r['seq_len']} "
        f"tokens, {r['tiles_per_step']} tiles/step, grad_accum {r['grad_accum']}, remat "
        f"{r['remat']}, compute {r['dtype']}, params {r['param_dtype']}",
        "per chip (GiB):",
        f"  trainable params   {r['trainable_gib']:9.3f}",
        f"  frozen params      {r['frozen_gib']:9.3f}",
        f"  optimizer state    {r['optimizer_gib']:9.3f}",
        *([f"  reference params   {r['reference_gib']:9.3f}   (MPO reference: "
           f"{r['reference']})"] if r.get("reference") else []),
        f"  batch              {r['batch_gib']:9.3f}",
        f"  arguments (all)    {r['arguments_gib']:9.3f}",
        f"  temporaries        {r['temporaries_gib']:9.3f}",
        f"  outputs - aliased  {r['outputs_gib'] - r['aliased_gib']:9.3f}",
        f"  generated code     {r['code_gib']:9.3f}",
        f"  peak (estimate)    {r['peak_gib']:9.3f}",
        f"FLOPs per step: model {r['model_flops_per_step']:.4g} "
        f"({r['model_flops_per_step'] / r['chips']:.4g} per chip, train/flops.py); XLA "
        f"{r['xla_flops_per_chip']:.4g} per chip (XLA counts a scanned loop body once)",
        "collectives per chip per step (MiB; loop bodies times their trip counts):",
        f"  within a slice (ICI)   {r['ici_collective_bytes'] / MIB:11.3f}",
        f"  across slices (DCN)    {r['dcn_collective_bytes'] / MIB:11.3f} in "
        f"{r['dcn_collective_ops']} ops"
        + "".join(f", {k} {v / MIB:.3f}" for k, v in sorted(r["dcn_bytes_by_op"].items())),
    ]
    return "\n".join(lines)


# --- collectives in compiled HLO -------------------------------------------------------------

_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "ragged-all-to-all")
_OP_RE = re.compile(r"\s(" + "|".join(_COLLECTIVES) + r")(?:-start)?\(")
_SHAPE_RE = re.compile(r"\b(pred|[suf]\d+|bf16|f8e\w+|c64|c128)\[([\d,]*)\]")
_CALLEE_RE = re.compile(r"\b(?:calls|body|condition|to_apply)=%?([\w.\-]+)")
_CALLEE_LIST_RE = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")
_TRIP_RE = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_IOTA_RE = re.compile(r"\[([\d,]+)\]<=\[([\d,]+)\](?:T\(([\d,]+)\))?")


def slice_of_logical_device(mesh) -> list[int]:
    """Slice of each device id in the compiled program's replica groups (the jit's device
    assignment is the mesh's devices in row-major order)."""
    return [int(getattr(d, "slice_index", 0)) for d in mesh.devices.flat]


def _bits(dtype: str) -> int:
    if dtype == "pred" or dtype.startswith("f8"):
        return 8
    if dtype == "bf16":
        return 16
    return max(int(dtype[1:]), 8)  # s4/u4 are stored a byte each


def _bytes(shapes_text: str) -> int:
    return sum(math.prod(int(x) for x in dims.split(",") if x) * _bits(dtype) // 8
               for dtype, dims in _SHAPE_RE.findall(shapes_text))


def _balanced(text: str, start: int, open_: str, close: str) -> int:
    """Index just past the bracket that closes the one at `start`."""
    depth = 0
    for i in range(start, len(text)):
        depth += text[i] == open_
        depth -= text[i] == close
        if depth == 0:
            return i + 1
    raise ValueError(f"unbalanced {open_}{close} in HLO: {text[start:start + 80]!r}")


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
        body = attrs[i:_balanced(attrs, i, "{", "}")]
        groups = [[int(x) for x in g.split(",") if x.strip()]
                  for g in re.findall(r"\{([\d,\s]*)\}", body[1:-1])]
        groups = [g for g in groups if g]
        return groups or [list(range(n_devices))]
    return [list(range(n_devices))]


def _computations(hlo: str) -> tuple[str, dict[str, list[str]]]:
    comps: dict[str, list[str]] = {}
    entry, current = "", None
    for line in hlo.splitlines():
        if line and not line[0].isspace() and line.rstrip().endswith("{"):
            head = line.split()
            is_entry = head[0] == "ENTRY"
            current = head[1 if is_entry else 0].lstrip("%")
            comps[current] = []
            if is_entry:
                entry = current
        elif line.strip() == "}":
            current = None
        elif current is not None:
            comps[current].append(line)
    if not entry:
        raise ValueError("no ENTRY computation in the compiled HLO")
    return entry, comps


def _trip_count(line: str, comps: dict[str, list[str]]) -> int:
    """Iterations of a while loop: XLA's known_trip_count, else (TPU executables drop it) the
    bound of a `counter < N` condition, as jax's scans and fori_loops count from 0."""
    trip = _TRIP_RE.search(line)
    if trip:
        return int(trip.group(1))
    cond = re.search(r"condition=%?([\w.\-]+)", line)
    body = comps.get(cond.group(1), []) if cond else []
    bounds = [int(n) for b in body for n in re.findall(r"s32\[\]\S* constant\((\d+)\)", b)]
    if len(bounds) == 1 and any("direction=LT" in b for b in body):
        return bounds[0]
    return 1


def _execution_counts(entry: str, comps: dict[str, list[str]]) -> dict[str, int]:
    """How often each computation runs per call of `entry` (while bodies x trip count)."""
    counts: dict[str, int] = {}

    def visit(name: str, times: int) -> None:
        counts[name] = counts.get(name, 0) + times
        for line in comps.get(name, ()):
            trips = _trip_count(line, comps) if " while(" in line else 1
            callees = _CALLEE_RE.findall(line)
            for group in _CALLEE_LIST_RE.findall(line):
                callees += [c.strip().lstrip("%") for c in group.split(",") if c.strip()]
            for callee in callees:
                if callee in comps:
                    visit(callee, times * trips)

    visit(entry, 1)
    return counts


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


def _collective_bytes(op: str, is_start: bool, result: str, group: int) -> int:
    """What one chip sends or assembles: an all-reduce's buffer, an all-gather's gathered
    output, a reduce-scatter's input (its output x group size). Async starts return (input,
    output, context...) tuples, except all-reduce-start, which returns its outputs."""
    if is_start and op != "all-reduce":
        size = max(_bytes(part) for part in _top_level(result))
    else:
        size = _bytes(result)
    return size * group if op == "reduce-scatter" else size


def collective_traffic(hlo: str, slice_of: list[int]) -> dict:
    """Bytes each chip moves through collectives per step, split into traffic inside a slice
    (ICI) and across slices (DCN).

    A TPU multislice executable is compiled per slice (`num_partitions` = chips per slice):
    its replica groups index the chips of one slice, and everything that crosses slices is a
    send to the megascale runtime (DCN all-reduce / all-gather / one-to-one transfers). In a
    program over all devices, a collective crosses slices when one of its device groups does.
    """
    entry, comps = _computations(hlo)
    counts = _execution_counts(entry, comps)
    head = re.search(r"num_partitions=(\d+)", hlo.split("\n", 1)[0])
    per_slice_program = head is not None and int(head.group(1)) < len(slice_of)
    ici = 0
    dcn: dict[str, int] = {}  # kind -> bytes
    dcn_ops = 0

    def add_dcn(kind: str, size: int) -> None:
        nonlocal dcn_ops
        dcn_ops += 1
        dcn[kind] = dcn.get(kind, 0) + size

    for name, lines in comps.items():
        times = counts.get(name, 0)
        for line in lines if times else ():
            if " send(" in line and "xla_megascale_runtime" in line:
                kind = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
                result = line.split("=", 1)[1].split(" send(", 1)[0]
                add_dcn("dcn-" + (kind.group(1).lower() if kind else "transfer"),
                        _bytes(_top_level(result)[0]) * times)
                continue
            m = _OP_RE.search(line)
            if m is None:
                continue
            op = m.group(1)
            close = _balanced(line, m.end() - 1, "(", ")")
            groups = parse_groups(line[close:], len(slice_of))
            result = line[line.index("=") + 1:m.start()]
            size = _collective_bytes(op, "-start(" in line[m.start():m.end()], result,
                                     len(groups[0])) * times
            if not per_slice_program and any(len({slice_of[d] for d in g}) > 1
                                             for g in groups):
                add_dcn(op, size)
            else:
                ici += size
    return {"ici_collective_bytes": ici, "dcn_collective_bytes": sum(dcn.values()),
            "dcn_collective_ops": dcn_ops, "dcn_bytes_by_op": dcn}
