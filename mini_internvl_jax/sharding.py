"""Logical axis names -> mesh axes: the one rules table, plus mesh and placement helpers.

Parameters and activations are annotated with logical names (`embed`, `heads`, ...). The table
below maps them to the mesh axes `data`, `fsdp` and `tensor`. A dimension that a mesh axis does
not divide evenly stays replicated on that axis (Qwen2's 2 KV heads on tensor=4, say) instead of
failing, so one table serves every mesh shape. Nothing else in the package names mesh axes for a
placement: the kernels' shard_map specs, the data groups of gradient accumulation and the batch
shard count are all read from this table (`logical_to_spec`, `mesh_axes_of`, `batch_shards`).
tests/golden/sharding/ pins the per-parameter result for the 1B/2B/4B presets.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Collection, Iterator, Sequence

import jax
import numpy as np
from flax import nnx
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")

# logical name -> mesh axis (or tuple of axes, or None = replicated)
LOGICAL_RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("batch", ("data", "fsdp")),
    ("tiles", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_mlp", "tensor"),
    ("act_vocab", "tensor"),
    # parameters
    ("layers", None),
    ("vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("norm", None),
    ("vision_embed", "fsdp"),
    ("vision_mlp", "tensor"),
    ("vision_heads", "tensor"),
    ("vision_patch", None),
    ("vision_pos", None),
    ("proj_in", "fsdp"),
    ("proj_out", "tensor"),
)

Rules = tuple[tuple[str, str | tuple[str, ...] | None], ...]
# Named rule sets (`mesh.rules` in the training config picks one). One today: FSDP over `fsdp`,
# tensor parallelism over `tensor`, batch rows over `data` x `fsdp`.
RULE_SETS: dict[str, Rules] = {"default": LOGICAL_RULES}

def resolve_sizes(sizes: Sequence[int], n_devices: int, what: str = "mesh") -> tuple[int, ...]:
    """Axis sizes with the one allowed -1 filled in so that they multiply to `n_devices`."""
    sizes = list(sizes)

    def describe() -> str:
        return ", ".join(f"{a}={s}" for a, s in zip(MESH_AXES, sizes, strict=True))

    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"{what} sizes ({describe()}) must be positive, with at most one -1")
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if n_devices % known:
            raise ValueError(f"{n_devices} devices cannot be split into {what} ({describe()})")
        sizes[sizes.index(-1)] = n_devices // known
    if math.prod(sizes) != n_devices:
        raise ValueError(f"{what} ({describe()}) needs {math.prod(sizes)} devices, "
                         f"{n_devices} are available")
    return tuple(sizes)


def hybrid_device_grid(devices: Sequence, ici: Sequence[int], dcn: Sequence[int]) -> np.ndarray:
    """Devices laid out as `ici * dcn` (per axis), each axis slice-major: index `i` of an axis of
    size ici*dcn lies in slice `i // ici`, so only the DCN factor of an axis crosses slices.

    Slices are the granules where devices know their `slice_index` (TPU multislice); elsewhere
    (GPU or CPU clusters) each process is one granule.
    """
    by_process = not hasattr(devices[0], "slice_index")
    return mesh_utils.create_hybrid_device_mesh(list(ici), list(dcn), list(devices),
                                                process_is_granule=by_process)


def count_slices(devices: Sequence) -> int:
    """Slices (TPU multislice) or, where devices carry no slice_index, processes."""
    key = "slice_index" if hasattr(devices[0], "slice_index") else "process_index"
    return len({getattr(d, key) for d in devices})


def make_mesh(data: int = 1, fsdp: int = -1, tensor: int = 1, devices=None, *,
              dcn: Sequence[int] = (1, 1, 1)) -> Mesh:
    """Mesh over `devices` (default: all devices of all hosts); one size may be -1 = the rest.

    `dcn` (data, fsdp, tensor) > 1 spans several slices: `data, fsdp, tensor` are then sizes
    within one slice, and each mesh axis is dcn x per-slice long (one axis name, so the logical
    rules table serves single- and multi-slice meshes alike).
    """
    devices_arg_is_default = devices is None
    devices = list(jax.devices() if devices is None else devices)
    dcn = tuple(dcn)
    if len(dcn) != len(MESH_AXES) or any(d < 1 for d in dcn):
        raise ValueError(f"mesh dcn sizes {dcn} must be {len(MESH_AXES)} positive ints "
                         f"({', '.join(MESH_AXES)})")
    slices = math.prod(dcn)
    if slices > 1:
        found = count_slices(devices)
        if found != slices:
            raise ValueError(
                f"mesh.dcn ({', '.join(f'{a}={d}' for a, d in zip(MESH_AXES, dcn, strict=True))})"
                f" needs devices in {slices} slices, found {found} "
                f"({len(devices)} {devices[0].platform} devices); set mesh.dcn to the number of "
                "slices (all 1 for a single slice)")
        if len(devices) % slices:
            raise ValueError(f"{len(devices)} devices do not split evenly into {slices} slices")
        ici = resolve_sizes([data, fsdp, tensor], len(devices) // slices, "per-slice mesh")
        grid = hybrid_device_grid(devices, ici, dcn)
        return Mesh(grid, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    sizes = resolve_sizes([data, fsdp, tensor], len(devices))
    if devices_arg_is_default:
        # jax.make_mesh orders devices along the physical interconnect (TPU torus).
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(AxisType.Auto,) * 3)
    return Mesh(np.asarray(devices).reshape(sizes), MESH_AXES,
                axis_types=(AxisType.Auto,) * 3)


# Mesh axes a `jax.vmap(..., spmd_axis_name=...)` in progress has taken for its mapped
# dimension; constraints inside it must not name them again.
_VMAPPED_AXES: contextvars.ContextVar[frozenset[str]] = contextvars.ContextVar(
    "vmapped_mesh_axes", default=frozenset())


@contextlib.contextmanager
def vmapped_axes(*axes: str) -> Iterator[None]:
    """While tracing a vmap over mesh `axes`, logical names leave those axes out."""
    token = _VMAPPED_AXES.set(_VMAPPED_AXES.get() | frozenset(axes))
    try:
        yield
    finally:
        _VMAPPED_AXES.reset(token)


def vmapped_mesh_axes() -> frozenset[str]:
    """The mesh axes taken by the vmaps being traced (see `vmapped_axes`)."""
    return _VMAPPED_AXES.get()


def _mesh_axis_sizes(mesh, exclude: Collection[str] = ()) -> dict[str, int]:
    taken = vmapped_mesh_axes() | frozenset(exclude)
    return {a: s for a, s in zip(mesh.axis_names, mesh.axis_sizes, strict=True)
            if a not in taken}


def logical_to_spec(names: Sequence[str | None] | None, shape: Sequence[int] | None = None,
                    mesh=None, rules=None, exclude: Collection[str] = ()) -> P:
    """PartitionSpec for logical `names`; drops mesh axes that don't divide the dim or repeat,
    and, with a mesh, the axes in `exclude` (e.g. already manual inside a shard_map)."""
    if names is None:
        return P()
    rules = dict(LOGICAL_RULES if rules is None else rules)
    sizes = _mesh_axis_sizes(mesh, exclude) if mesh is not None else None
    used: set[str] = set()
    out: list[str | tuple[str, ...] | None] = []
    for i, name in enumerate(names):
        target = rules.get(name) if name is not None else None
        if target is None:
            out.append(None)
            continue
        axes = (target,) if isinstance(target, str) else tuple(target)
        kept: list[str] = []
        for ax in axes:
            if ax in used:
                continue
            if sizes is not None:
                if ax not in sizes:
                    continue
                if shape is not None:
                    total = math.prod(sizes[a] for a in kept) * sizes[ax]
                    if shape[i] % total:
                        continue
            kept.append(ax)
        used.update(kept)
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return P(*out)


def mesh_axes_of(name: str, mesh=None, rules=None) -> tuple[str, ...]:
    """The mesh axes the rules map logical `name` to (those `mesh` has, when given)."""
    target = logical_to_spec((name,), None, mesh, rules)[0]
    return () if target is None else (target,) if isinstance(target, str) else tuple(target)


def batch_shards(mesh, rules=None) -> int:
    """Into how many shards the rules split a batch's rows on `mesh` (1 without a mesh)."""
    if mesh is None:
        return 1
    return math.prod(dict(mesh.shape)[a] for a in mesh_axes_of("batch", mesh, rules))


def data_group_axis(rules=None) -> str:
    """The mesh axis whose groups accumulate their own gradients (train/step.py): the first,
    outermost axis the rules shard batch rows over, the one that spans slices."""
    return mesh_axes_of("batch", rules=rules)[0]


def param_names(variable) -> tuple | None:
    return variable.get_metadata().get("out_sharding")


def variable_spec(v: nnx.Variable, mesh, rules=None) -> P:
    """Where the rules place one Variable (abstract or concrete) on `mesh`."""
    shape = v.shape if hasattr(v, "shape") else v[...].shape
    return logical_to_spec(param_names(v), shape, mesh, rules)


def state_shardings(state, mesh: Mesh, rules=None):
    """NamedSharding tree for an nnx State or any tree of Variables (abstract or concrete)
    from their logical names; plain arrays (optimizer counters, say) are replicated."""

    def one(x):
        if isinstance(x, nnx.Variable):
            return x.replace(NamedSharding(mesh, variable_spec(x, mesh, rules)))
        return NamedSharding(mesh, P())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_activation(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op outside a mesh context."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty:
        return x
    spec = logical_to_spec(names, x.shape, mesh)
    return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def create_sharded_model(make_model, mesh: Mesh, rules=None):
    """Builds `make_model()` with every parameter created directly in its sharded place."""
    with nnx.use_eager_sharding(False):
        abstract = nnx.eval_shape(make_model)
        graphdef, abs_state = nnx.split(abstract)
        shardings = state_shardings(abs_state, mesh, rules)

        def init():
            return nnx.state(make_model())

        with jax.set_mesh(mesh):
            state = jax.jit(init, out_shardings=shardings)()
    return nnx.merge(graphdef, state)
