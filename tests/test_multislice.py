"""Multi-slice (DCN) meshes on 8 CPU devices, and reading cross-slice traffic from HLO text."""

from dataclasses import dataclass

import jax
import numpy as np
import pytest
from jax.sharding import AxisType, Mesh, NamedSharding

from mini_internvl_jax.configlib import ConfigError
from mini_internvl_jax.sharding import hybrid_device_grid, logical_to_spec, make_mesh
from mini_internvl_jax.tools.hlo import collective_traffic, parse_groups
from mini_internvl_jax.train.config import train_config_from_dict


@dataclass(frozen=True)
class FakeTpuSliceDevice:
    """What create_hybrid_device_mesh reads of a device: its slice, platform and kind."""

    id: int
    slice_index: int
    platform: str = "cpu"
    device_kind: str = "cpu"


# Slices interleaved by id, so a layout that ignored slices would show.
FAKE = [FakeTpuSliceDevice(i, i % 2) for i in range(8)]


def _ids(grid) -> list:
    return np.vectorize(lambda d: d.id)(grid).tolist()


def test_dcn_data_puts_one_slice_per_data_index():
    # per slice (data 1, fsdp 2, tensor 2); slice 0 = ids 0,2,4,6 in order, slice 1 = 1,3,5,7
    grid = hybrid_device_grid(FAKE, (1, 2, 2), (2, 1, 1))
    assert _ids(grid) == [[[0, 2], [4, 6]], [[1, 3], [5, 7]]]


def test_dcn_fsdp_is_slice_major_along_fsdp():
    grid = hybrid_device_grid(FAKE, (2, 2, 1), (1, 2, 1))
    # fsdp indices 0-1 are slice 0, 2-3 slice 1; data/tensor inside each slice
    assert _ids(grid) == [[[0], [2], [1], [3]], [[4], [6], [5], [7]]]


def _real_mesh(grid):
    real = {d.id: d for d in jax.devices()}
    return Mesh(np.vectorize(lambda d: real[d.id], otypes=[object])(grid),
                ("data", "fsdp", "tensor"), axis_types=(AxisType.Auto,) * 3)


def _slices_holding(mesh, names, shape) -> dict[int, set]:
    """slice -> set of index tuples (as slices) that its devices hold of an array."""
    sharding = NamedSharding(mesh, logical_to_spec(names, shape, mesh))
    out: dict[int, set] = {}
    for dev, idx in sharding.devices_indices_map(shape).items():
        out.setdefault(FAKE[dev.id].slice_index, set()).add(
            tuple((s.start or 0, s.stop or n) for s, n in zip(idx, shape, strict=True)))
    return out


def test_one_rules_table_gives_data_parallel_across_slices():
    mesh = _real_mesh(hybrid_device_grid(FAKE, (1, 2, 2), (2, 1, 1)))
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    rows = _slices_holding(mesh, ("batch", "length"), (8, 16))
    assert rows == {0: {((0, 2), (0, 16)), ((2, 4), (0, 16))},
                    1: {((4, 6), (0, 16)), ((6, 8), (0, 16))}}
    # FSDP stays inside a slice: each slice holds every parameter row.
    params = _slices_holding(mesh, ("embed", "mlp"), (64, 32))
    for held in params.values():
        assert {r for r, _ in held} == {(0, 32), (32, 64)}


def test_dcn_fsdp_shards_parameters_across_slices():
    mesh = _real_mesh(hybrid_device_grid(FAKE, (1, 2, 2), (1, 2, 1)))
    params = _slices_holding(mesh, ("embed", "mlp"), (64, 32))
    assert {r for r, _ in params[0]} == {(0, 16), (16, 32)}
    assert {r for r, _ in params[1]} == {(32, 48), (48, 64)}


def test_dcn_on_a_single_slice_is_a_clear_error():
    with pytest.raises(ValueError, match=r"needs devices in 2 slices, found 1 \(8 cpu"):
        make_mesh(1, -1, 1, dcn=(2, 1, 1))
    # a one-slice dcn is the plain mesh, per-slice sizes = all devices
    assert dict(make_mesh(1, -1, 1, dcn=(1, 1, 1)).shape) == {"data": 1, "fsdp": 8, "tensor": 1}


@pytest.mark.parametrize("dcn, match", [
    ({"tensor": 2}, "mesh.dcn.tensor: must be 1"),
    ({"data": 0}, "mesh.dcn.data: must be >= 1"),
    ({"fsdp": -1}, "mesh.dcn.fsdp: must be >= 1"),
    ({"pipeline": 2}, r"mesh.dcn: unknown key\(s\) \['pipeline'\]"),
])
def test_bad_dcn_config_names_the_field(dcn, match):
    with pytest.raises(ConfigError, match=match):
        train_config_from_dict({"model": "tiny-qwen2", "mesh": {"dcn": dcn}})


def test_replica_group_forms():
    assert parse_groups(", replica_groups={{0,1},{2,3}}, x=1", 4) == [[0, 1], [2, 3]]
    assert parse_groups(", replica_groups=[2,4]<=[8], x", 8) == [[0, 1, 2, 3], [4, 5, 6, 7]]
    # iota over (4, 2) transposed: ids 0..7 as [[0,1],[2,3],[4,5],[6,7]].T -> rows of 4
    assert parse_groups(", replica_groups=[2,4]<=[4,2]T(1,0)", 8) == [[0, 2, 4, 6],
                                                                       [1, 3, 5, 7]]
    assert parse_groups(", replica_groups={}", 4) == [[0, 1, 2, 3]]
    assert parse_groups(", source_target_pairs={{0,4},{4,0}}", 8) == [[0, 4], [4, 0]]


HLO = "\n".join([
    "HloModule jit_step, num_partitions=8",
    "",
    "%body (p: (s32[], f32[16])) -> (s32[], f32[16]) {",
    "  %p = (s32[], f32[16]{0}) parameter(0)",
    "  %ar = f32[16]{0} all-reduce(%x), channel_id=1, replica_groups=[4,2]<=[2,4]T(1,0),"
    " to_apply=%add",
    "  ROOT %t = (s32[], f32[16]{0}) tuple(%i, %ar)",
    "}",
    "",
    "%body2 (p: (s32[], f32[16])) -> (s32[], f32[16]) {",
    "  %ar = f32[4]{0} all-reduce(%x), channel_id=5, replica_groups={{0,1,2,3,4,5,6,7}}",
    "}",
    "",
    "%cond (p: (s32[], f32[16])) -> pred[] {",
    "  %n = s32[]{:T(128)} constant(3)",
    "  ROOT %c = pred[] compare(%i, %n), direction=LT",
    "}",
    "",
    "ENTRY %main (a: bf16[4,8]) -> f32[16] {",
    "  %ag = bf16[16,8]{1,0} all-gather(%a), replica_groups={{0,1,2,3},{4,5,6,7}},"
    " dimensions={0}",
    "  %rs = bf16[2,8]{1,0} reduce-scatter(%b), replica_groups=[4,2]<=[8], dimensions={0}",
    # TPU executables keep no known_trip_count: the bound comes from the condition
    "  %w = (s32[], f32[16]) while(%i), condition=%cond, body=%body, metadata={}",
    "  %w2 = (s32[], f32[16]) while(%i), condition=%cond, body=%body2,"
    ' backend_config={"known_trip_count":{"n":"5"}}',
    "  %cp = (bf16[4,8]{1,0}, bf16[4,8]{1,0}, u32[], u32[]) collective-permute-start(%a),"
    " channel_id=4, source_target_pairs={{0,4},{4,0}}",
    "  ROOT %r = f32[16]{0} get-tuple-element(%w), index=1",
    "}",
])


def test_collective_traffic_by_hand():
    slice_of = [0, 0, 0, 0, 1, 1, 1, 1]
    r = collective_traffic(HLO, slice_of)
    # within a slice: all-gather output 16*8*2 = 256 B; reduce-scatter input 2*8*2 * group 2
    # = 64 B (groups {0,1},{2,3},.. stay in a slice)
    assert r["ici_collective_bytes"] == 256 + 64
    # across: the first loop's all-reduce (groups {0,4},{1,5},..) 16*4 B x 3 trips, the second
    # loop's over all 8 devices 4*4 B x 5 trips; the permute 64 B
    assert r["dcn_bytes_by_op"] == {"all-reduce": 3 * 64 + 5 * 16, "collective-permute": 64}
    assert r["dcn_collective_bytes"] == 3 * 64 + 5 * 16 + 64 and r["dcn_collective_ops"] == 3


def test_per_slice_program_counts_megascale_sends_as_dcn():
    hlo = ("HloModule m, num_partitions=4\n\nENTRY %main () -> f32[] {\n"
           "  %ag = bf16[16,8]{1,0} all-gather(%a), channel_id=2, replica_groups={{0,1,2,3}}\n"
           '  %send = (s32[1,128]{1,0}, u32[], token[]) send(%x, %y), channel_id=7, '
           'is_host_transfer=true, frontend_attributes={_xla_host_transfer_handler_name='
           '"xla_megascale_runtime",_xla_megascale_transfer_type="ALL_REDUCE"}\n'
           "  %recv = (s32[1,128]{1,0}, u32[], token[]) recv(%y), channel_id=8\n"
           "}\n")
    r = collective_traffic(hlo, [0, 0, 0, 0, 1, 1, 1, 1])
    assert r["ici_collective_bytes"] == 256
    assert r["dcn_bytes_by_op"] == {"dcn-all_reduce": 512} and r["dcn_collective_ops"] == 1
