"""Golden per-parameter shardings of the real presets (1B/2B/4B) on two meshes.

Every parameter's path, shape, logical names and PartitionSpec, as `sharding.variable_spec`
places it with the rules table, is compared with tests/golden/sharding/PRESET.MESH.json. A change
of the rules, of a parameter's logical names or of the divisibility fallback shows up here as a
diff naming the parameters it moves. Abstract shapes only (`nnx.eval_shape`): no weights, no
devices (an AbstractMesh). After an intended change, rewrite the files with
`MIVL_UPDATE_GOLDEN=1 python -m pytest tests/test_sharding_golden.py` and review the diff.
"""

import json
import os
from functools import cache
from pathlib import Path

import jax
import pytest
from flax import nnx
from jax.sharding import AbstractMesh

from mini_internvl_jax.config import ComputeConfig, load_model_config
from mini_internvl_jax.models import InternVLModel
from mini_internvl_jax.sharding import LOGICAL_RULES, MESH_AXES, param_names, variable_spec

GOLDEN = Path(__file__).parent / "golden" / "sharding"
PRESETS = ("mini-internvl-1b", "mini-internvl-2b", "mini-internvl-4b")
MESHES = {"fsdp4": (1, 4, 1), "data2-fsdp2-tensor2": (2, 2, 2)}  # (data, fsdp, tensor)


@cache
def abstract_state(preset: str):
    """The training layout (scanned layers), shapes only."""
    cfg = load_model_config(preset)
    compute = ComputeConfig(scan_layers=True)
    with nnx.use_eager_sharding(False):  # logical names only, no mesh needed
        return nnx.state(nnx.eval_shape(lambda: InternVLModel(cfg, compute, rngs=nnx.Rngs(0))))


def _spec_json(spec) -> list:
    return [list(s) if isinstance(s, tuple) else s for s in spec]


def dump(preset: str, mesh_name: str, rules=LOGICAL_RULES) -> dict:
    mesh = AbstractMesh(MESHES[mesh_name], MESH_AXES)
    leaves = jax.tree_util.tree_flatten_with_path(
        abstract_state(preset), is_leaf=lambda x: isinstance(x, nnx.Variable))[0]
    out = {}
    for path, v in leaves:
        key = ".".join(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)
        out[key] = {"shape": list(v.shape), "names": list(param_names(v) or ()),
                    "spec": _spec_json(variable_spec(v, mesh, rules))}
    return dict(sorted(out.items()))


def _diff(want: dict, got: dict) -> list[str]:
    lines = [f"{k}: only in the golden file" for k in want.keys() - got.keys()]
    lines += [f"{k}: new parameter {got[k]}" for k in got.keys() - want.keys()]
    lines += [f"{k}: {want[k]} -> {got[k]}" for k in want.keys() & got.keys()
              if want[k] != got[k]]
    return sorted(lines)


CASES = [(p, m) for p in PRESETS for m in MESHES]


@pytest.mark.parametrize("preset,mesh_name", CASES)
def test_shardings_match_the_golden_dump(preset, mesh_name):
    path = GOLDEN / f"{preset}.{mesh_name}.json"
    got = dump(preset, mesh_name)
    if os.environ.get("MIVL_UPDATE_GOLDEN"):
        path.write_text("{\n" + ",\n".join(f" {json.dumps(k)}: {json.dumps(v)}"
                                          for k, v in got.items()) + "\n}\n")
    diff = _diff(json.loads(path.read_text()), got)
    assert not diff, (f"{len(diff)} parameter(s) of {preset} moved on {mesh_name}:\n"
                      + "\n".join(diff[:40]))


def test_a_rule_change_breaks_the_dumps():
    """The test of the test: FSDP of `embed` switched off (a one-line rules edit), and the
    1B dump on fsdp=4 names the parameters that moved; the real table still matches."""
    changed = tuple((k, None if k == "embed" else v) for k, v in LOGICAL_RULES)
    want = json.loads((GOLDEN / "mini-internvl-1b.fsdp4.json").read_text())
    diff = _diff(want, dump("mini-internvl-1b", "fsdp4", changed))
    assert any(d.startswith("llm.embed_tokens") for d in diff), diff
    assert all("embed" in json.dumps(want[d.split(":")[0]]["names"]) for d in diff), diff
    assert not _diff(want, dump("mini-internvl-1b", "fsdp4"))


def test_the_rule_set_is_named_in_the_mesh_config():
    from mini_internvl_jax.configlib import ConfigError
    from mini_internvl_jax.train.config import train_config_from_dict

    cfg = train_config_from_dict({"model": "tiny-qwen2"})
    assert cfg.mesh.rules == "default" and cfg.mesh.rule_table is LOGICAL_RULES
    with pytest.raises(ConfigError, match="mesh.rules: 'nope' is not one of"):
        train_config_from_dict({"model": "tiny-qwen2", "mesh": {"rules": "nope"}})
