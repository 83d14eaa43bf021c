"""Compile the full training step for a TPU topology on any machine with libtpu installed.

`mivl-train --config ... --aot-tpu v5e:2x2` builds the mesh over the topology's
compile-only devices, lowers the jitted step on abstract arguments (nothing is allocated) and
compiles it, then reports XLA's per-chip memory analysis and FLOPs, and the step's roofline
from its HLO (tools/hlo.py: FLOPs and HBM bytes kernel by kernel, against the chip's peak and
bandwidth): the way to size a pod before paying for it. `--num-slices 2` compiles for two
such slices joined by the data-centre network (DCN) and adds the bytes each chip sends
through collectives that cross slices, read from the compiled HLO: the traffic that DCN
bandwidth, not ICI, has to carry.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import re

import jax
import numpy as np

from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.sharding import make_mesh
from mini_internvl_jax.tools.hlo import CHIPS, analyze, collective_traffic, kernel_seconds
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


# Usable HBM per chip by device kind (Google Cloud TPU documentation), for topologies whose
# compile-only devices cannot report it. A real device's own limit (memory_stats) comes first.
HBM_GIB = {"TPU v5 lite": 15.75, "TPU v5": 95.0, "TPU v6 lite": 31.25, "TPU v4": 31.25}
# Device kind -> the chip of tools/hlo.CHIPS whose roofline `remat: auto` ranks policies by.
CHIP_OF_KIND = {"TPU v5 lite": "v5e", "TPU v5": "v5p", "TPU v6 lite": "v6e"}
# (LLM policy, vision policy or None for the same) from the least recomputation to the most:
# `remat: auto` takes the first whose compiled step fits the chip. Keeping the ViT's matmul
# outputs while the LLM keeps only its attention results is the middle ground for a chip that
# cannot hold both parts' matmul outputs (2B at W1 on v5e: save_dots needs 17 GB).
REMAT_ORDER: tuple[tuple[str, str | None], ...] = (
    ("none", None), ("save_dots", None), ("save_attention", "save_dots"),
    ("save_attention", None), ("full", None))


def remat_label(llm: str, vision: str | None) -> str:
    return llm if vision in (None, llm) else f"{llm} (vision {vision})"


def hbm_budget(device) -> float:
    """Bytes of memory one device offers a program, or raise when nobody knows."""
    stats = getattr(device, "memory_stats", lambda: None)
    try:
        limit = (stats() or {}).get("bytes_limit")
    except Exception:  # compile-only topology devices have no runtime to ask
        limit = None
    if limit:
        return float(limit)
    if device.device_kind in HBM_GIB:
        return HBM_GIB[device.device_kind] * GIB
    raise ConfigError(f"remat auto: the memory of a {device.device_kind!r} device is unknown; "
                      f"set compute.remat to one of {[p for p, v in REMAT_ORDER if v is None]}")


def peak_bytes(compiled) -> float:
    """XLA's per-device peak estimate of a compiled program."""
    mem = compiled.memory_analysis()
    return float(mem.argument_size_in_bytes + mem.output_size_in_bytes
                 - mem.alias_size_in_bytes + mem.temp_size_in_bytes
                 + mem.generated_code_size_in_bytes)


def _compile_step(cfg: TrainConfig, mesh, model_cfg):
    s = build_abstract(cfg, mesh, model_cfg)
    batch = s.batch_abstract()
    with jax.set_mesh(mesh):
        compiled = s.step_fn.lower(s.state, batch).compile()
    return s, batch, compiled


def choose_remat(cfg: TrainConfig, mesh, model_cfg=None, budget: float | None = None):
    """(cfg with the chosen policies, its setup, batch and compiled step, [(policy, peak bytes,
    per-kernel roofline seconds or None)] tried) for `budget` bytes per device (default: the
    mesh's device memory).

    On a chip whose peak and bandwidth tools/hlo.CHIPS knows, every policy of REMAT_ORDER is
    compiled and, of those that fit, the one with the smallest per-kernel roofline wins: less
    recomputation is not always faster (4B at W1 on v5p: `none` fits, but its weight-gradient
    fusions read twice the bytes, 406 ms against 333 ms for `save_dots`). Elsewhere (GPU, CPU)
    the first that fits, compiling stopping there."""
    model_cfg = model_cfg or build_model_config(cfg)
    device = mesh.devices.flat[0]
    budget = hbm_budget(device) if budget is None else budget
    chip = CHIP_OF_KIND.get(device.device_kind)
    tried: list[tuple[str, float, float | None]] = []
    best: tuple | None = None
    for policy, vision in REMAT_ORDER:
        c = dataclasses.replace(cfg, compute=cfg.compute.replace(remat=policy,
                                                                 remat_vision=vision))
        label = remat_label(policy, vision)
        try:
            s, batch, compiled = _compile_step(c, mesh, model_cfg)
        except Exception as e:  # XLA:TPU refuses to compile a program that overflows HBM
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            tried.append((label, _required_bytes(str(e)), None))
            continue
        peak = peak_bytes(compiled)
        if peak > budget:
            tried.append((label, peak, None))
            continue
        if chip is None:
            tried.append((label, peak, None))
            return c, s, batch, compiled, tried
        seconds = kernel_seconds(analyze(compiled.as_text()).kernels, *CHIPS[chip])
        tried.append((label, peak, seconds))
        if best is None or seconds < best[0]:
            best = (seconds, c, s, batch, compiled)
    if best is not None:
        return (*best[1:], tried)
    raise ConfigError("remat auto: no policy fits " + f"{budget / GIB:.2f} GiB per device ("
                      + ", ".join(f"{p} {b / GIB:.2f} GiB" for p, b, _ in tried)
                      + "): lower batch_size or seq_len, or shard over more chips")


def _required_bytes(message: str) -> float:
    """What an out-of-memory compile error says the program needs (at least), else inf."""
    m = re.search(r"required for [\w ]+\(([\d.]+)([KMGT])\)", message)
    if m is None:
        return float("inf")
    return float(m.group(1)) * 1024.0 ** "KMGT".index(m.group(2)) * 1024


def format_choice(chosen: TrainConfig, tried: list[tuple[str, float, float | None]],
                  budget: float | None = None) -> str:
    timed = any(t is not None for _, _, t in tried)
    return ("remat auto -> " + remat_label(chosen.compute.remat, chosen.compute.remat_vision)
            + " (compiled peak per device" + (", per-kernel roofline" if timed else "") + ": "
            + ", ".join(f"{p} {b / GIB:.2f} GiB" + ("" if t is None else f" {t * 1e3:.1f} ms")
                        for p, b, t in tried)
            + ("" if budget is None else f"; budget {budget / GIB:.2f} GiB") + ")")


def pick_remat(cfg: TrainConfig, mesh, model_cfg=None):
    """`choose_remat` for the memory of the mesh's devices: (cfg, setup, batch, compiled step,
    the one-line report of what was tried and chosen)."""
    budget = hbm_budget(mesh.devices.flat[0])
    cfg, s, batch, compiled, tried = choose_remat(cfg, mesh, model_cfg, budget)
    return cfg, s, batch, compiled, format_choice(cfg, tried, budget)


def resolve_remat(cfg: TrainConfig, devices=None) -> TrainConfig:
    """`cfg` with `compute.remat: auto` replaced by the chosen policy (printed), for a run on
    `devices` (default: this process's); any other policy is returned as it is."""
    if cfg.compute.remat != "auto":
        return cfg
    devices = jax.devices() if devices is None else devices
    mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices,
                     dcn=cfg.mesh.dcn.sizes)
    chosen, *_, line = pick_remat(cfg, mesh)
    print(line, flush=True)
    return chosen


def compile_for_topology(cfg: TrainConfig, topology: str, num_slices: int = 1) -> dict:
    dcn = dcn_for(cfg, num_slices)
    devices = topology_devices(topology, num_slices)
    model_cfg = build_model_config(cfg)
    try:
        mesh = make_mesh(cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor, devices, dcn=dcn.sizes)
    except ValueError as e:  # sizes that do not split the topology's chips: a config mistake
        raise ConfigError(f"mesh: {e} (--aot-tpu {topology} x {num_slices} slice(s): "
                          f"{len(devices)} chips)") from None
    remat_choice = ""
    if cfg.compute.remat == "auto":
        cfg, s, batch, compiled, remat_choice = pick_remat(cfg, mesh, model_cfg)
    else:
        s, batch, compiled = _compile_step(cfg, mesh, model_cfg)
    mem = compiled.memory_analysis()
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    tiles = cfg.max_tiles * cfg.optim.grad_accum
    model_flops = flops.step_flops(model_cfg, batch=cfg.batch_size, seq_len=cfg.seq_len,
                                   tiles=tiles, trainable=frozenset(flops.PARTS)
                                   - cfg.frozen_components)
    hlo = compiled.as_text()
    traffic = collective_traffic(hlo, slice_of_logical_device(mesh))
    chip = topology.split(":")[0]
    try:
        anatomy = analyze(hlo)
        roofline: dict | str = anatomy.roofline(model_flops / len(devices), {chip: CHIPS[chip]}
                                                if chip in CHIPS else CHIPS)
        hlo_flops, hlo_bytes = anatomy.flops, anatomy.bytes
    except ValueError as e:  # a kernel without a cost estimate: no bound rather than a low one
        roofline, hlo_flops, hlo_bytes = f"unavailable: {e}", float("nan"), float("nan")
    return {
        "topology": topology, "num_slices": num_slices, "chips": len(devices),
        "device_kind": devices[0].device_kind, "mesh": dict(mesh.shape),
        "dcn": dict(zip(mesh.axis_names, dcn.sizes, strict=True)),
        "model": model_cfg.name, "stage": cfg.stage,
        "batch_size": cfg.batch_size, "seq_len": cfg.seq_len, "tiles_per_step": tiles,
        "grad_accum": cfg.optim.grad_accum,
        "remat": remat_label(cfg.compute.remat, cfg.compute.remat_vision),
        "remat_choice": remat_choice,
        "dtype": cfg.compute.dtype, "param_dtype": cfg.compute.param_dtype,
        "trainable_gib": per_device_bytes(s.state.params) / GIB,
        "frozen_gib": per_device_bytes(s.state.frozen) / GIB,
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
        "hlo_flops_per_chip": hlo_flops, "hlo_hbm_bytes_per_chip": hlo_bytes,
        "roofline": roofline,
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
        *([r["remat_choice"]] if r.get("remat_choice") else []),
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
        "roofline per step per chip (tools/hlo.py; loop bodies times their trip counts): "
        f"HLO {r['hlo_flops_per_chip']:.4g} FLOPs, {r['hlo_hbm_bytes_per_chip'] / 1e9:.1f} GB "
        "of HBM traffic",
        *([f"  {r['roofline']}"] if isinstance(r["roofline"], str) else [
            f"  {chip}: {1e3 * t['per_kernel_s']:.1f} ms kernel by kernel, "
            f"{1e3 * t['global_s']:.1f} ms whole-step bound, model FLOPs alone "
            f"{1e3 * t['model_flops_s']:.1f} ms ({t['per_kernel_s'] / t['model_flops_s']:.2f}x)"
            for chip, t in r["roofline"].items()]),
        "collectives per chip per step (MiB; loop bodies times their trip counts):",
        f"  within a slice (ICI)   {r['ici_collective_bytes'] / MIB:11.3f}",
        f"  across slices (DCN)    {r['dcn_collective_bytes'] / MIB:11.3f} in "
        f"{r['dcn_collective_ops']} ops"
        + "".join(f", {k} {v / MIB:.3f}" for k, v in sorted(r["dcn_bytes_by_op"].items())),
    ]
    return "\n".join(lines)


# --- collectives in compiled HLO (read by tools/hlo.py) ------------------------------------


def slice_of_logical_device(mesh) -> list[int]:
    """Slice of each device id in the compiled program's replica groups (the jit's device
    assignment is the mesh's devices in row-major order)."""
    return [int(getattr(d, "slice_index", 0)) for d in mesh.devices.flat]
