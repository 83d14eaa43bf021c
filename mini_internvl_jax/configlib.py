"""Typed dataclass configs from YAML files plus `key=value` overrides.

One small mechanism shared by the model, data and training configs: nested frozen
dataclasses built from plain dicts, with unknown keys and wrong types reported by their
dotted path so a user can find the line in their YAML.
"""

from __future__ import annotations

import copy
import dataclasses
import importlib.resources
import types
import typing
from importlib.resources.abc import Traversable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import yaml
from etils import epath

from mini_internvl_jax.errors import UserError

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T", bound="DataclassInstance")

# The presets live in configs/ at the repository root and install as this package's data
# (pyproject.toml maps `mini_internvl_jax.configs` to that folder).
PRESET_PACKAGE = "mini_internvl_jax.configs"
PresetKind = Literal["models", "train"]


class ConfigError(UserError, ValueError):
    """A config value or key that cannot be used; the message names the field."""


def check(cond: bool, where: str, msg: str) -> None:
    """Raises ConfigError("where: msg") unless `cond`: the one validation helper of configs."""
    if not cond:
        raise ConfigError(f"{where}: {msg}")


def check_choices(cfg: Any, prefix: str = "") -> None:
    """Literal-typed fields hold one of their values, also when built in Python (not YAML)."""
    hints = typing.get_type_hints(type(cfg))
    for f in dataclasses.fields(cfg):
        tp, allows_none = _resolve_type(hints[f.name])
        value = getattr(cfg, f.name)
        if typing.get_origin(tp) is Literal and not (value is None and allows_none):
            check(value in typing.get_args(tp), f"{prefix}{f.name}",
                  f"{value!r} is not one of {list(typing.get_args(tp))}")


def _resolve_type(tp: Any) -> tuple[Any, bool]:
    """Strip `Optional[...]`; report whether None is allowed."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        allows_none = len(args) != len(typing.get_args(tp))
        if len(args) == 1:
            return args[0], allows_none
        return tp, allows_none
    return tp, False


def _coerce(value: Any, tp: Any, path: str) -> Any:
    tp, allows_none = _resolve_type(tp)
    if value is None:
        if allows_none:
            return None
        raise ConfigError(f"{path}: None is not allowed (expected {getattr(tp, '__name__', tp)})")
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping for {tp.__name__}, got {value!r}")
        return from_dict(tp, value, path)
    origin = typing.get_origin(tp)
    if origin in (tuple, list):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{path}: expected a list, got {value!r}")
        args = typing.get_args(tp)
        item_tp = args[0] if args else Any
        items = [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if origin is tuple else items
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path}: expected a mapping, got {value!r}")
        return dict(value)
    if typing.get_origin(tp) is typing.Literal:
        allowed = typing.get_args(tp)
        if value not in allowed:
            raise ConfigError(f"{path}: {value!r} is not one of {list(allowed)}")
        return value
    if tp is float:
        if isinstance(value, str):  # PyYAML reads `1e-06` (no dot) as a string
            try:
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{path}: expected a number, got {value!r}")
        return float(value)
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{path}: expected an integer, got {value!r}")
        return value
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{path}: expected true/false, got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{path}: expected a string, got {value!r}")
        return value
    return value


def from_dict(cls: type[T], data: dict, path: str = "") -> T:
    """Builds dataclass `cls` from `data`; unknown keys are an error naming the valid ones."""
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        where = path or cls.__name__
        raise ConfigError(
            f"{where}: unknown key(s) {unknown}; valid keys are {sorted(fields)}"
        )
    kwargs = {}
    for name, value in data.items():
        default = _default_dataclass(fields[name])
        if isinstance(value, dict) and default is not None:
            # A partial mapping changes only the keys it names of the field's default (a
            # training preset's `compute: {remat: none}` keeps its other training defaults).
            value = {f.name: getattr(default, f.name) for f in dataclasses.fields(default)
                     if f.init} | value
        kwargs[name] = _coerce(value, hints[name], f"{path}.{name}" if path else name)
    try:
        return cls(**kwargs)
    except TypeError as e:  # missing required fields
        raise ConfigError(f"{path or cls.__name__}: {e}") from None


def _default_dataclass(f: dataclasses.Field) -> Any:
    """The field's default when it is a dataclass instance (from a default factory), else None."""
    if f.default_factory is dataclasses.MISSING:
        return None
    default = f.default_factory()
    return default if dataclasses.is_dataclass(default) else None


def to_dict(cfg: Any) -> Any:
    """Plain YAML/JSON-able form of a config (tuples become lists)."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def parse_override(text: str) -> tuple[list[str], Any]:
    """`a.b.c=value` -> (['a','b','c'], parsed value); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {text!r} has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError as e:
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"override {text!r}: value is not valid YAML ({problem})") from None
    return key.split("."), value


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Returns a copy of the nested dict `data` with `key=value` overrides applied."""
    data = copy.deepcopy(data)
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            nxt = node.get(k)
            if nxt is None:
                nxt = node[k] = {}
            if not isinstance(nxt, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
            node = nxt
        node[keys[-1]] = value
    return data


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last one
    silently, so a stray second `lr:` would win without a word)."""

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep)


def _parse_yaml(text: str, where: str) -> dict:
    """Both preset files and user files go through here, so both refuse duplicate keys."""
    try:
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f" (line {mark.line + 1})" if mark is not None else ""
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise ConfigError(f"config file {where} is not valid YAML{line}: {problem}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"config file {where} must hold a mapping at the top level")
    return data


def read_yaml(path: str | Path) -> dict:
    file = epath.Path(path)  # local or on a store
    if not file.is_file():
        raise ConfigError(f"config file {path} does not exist")
    return _parse_yaml(file.read_text(), str(path))


def preset_root() -> Traversable:
    """The presets folder: configs/ beside the package in a source checkout (so a checkout on
    PYTHONPATH reads its own presets, not an installed copy's), else the installed package
    data."""
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file() and (checkout / "configs").is_dir():
        return checkout / "configs"
    return importlib.resources.files(PRESET_PACKAGE)


def preset_names(kind: PresetKind) -> list[str]:
    """The bundled presets of one kind: `models` or `train`."""
    folder = preset_root().joinpath(kind)
    return sorted(p.name[:-5] for p in folder.iterdir() if p.name.endswith(".yaml"))


def read_preset(kind: PresetKind, name_or_path: str | Path) -> dict:
    """A bundled preset of `kind` by name (`mini-internvl-1b`, `stage2`), or a YAML file path."""
    if Path(name_or_path).suffix in (".yaml", ".yml"):
        return read_yaml(name_or_path)
    resource = preset_root().joinpath(kind, f"{name_or_path}.yaml")
    if not resource.is_file():
        label = "model" if kind == "models" else "training"
        raise ConfigError(f"unknown {label} preset {str(name_or_path)!r}; known {label} presets: "
                          f"{preset_names(kind)} (or pass a .yaml path)")
    return _parse_yaml(resource.read_text(), f"{kind}/{name_or_path}.yaml (bundled preset)")
