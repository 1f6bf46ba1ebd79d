"""Experiment configs: YAML files mapped onto typed dataclasses, with dotted overrides.

Every key is checked before any work starts: an unknown key fails with the list of valid
ones, and so does an unknown aligner or fusion-strategy name (through the registries).

    cfg = load_config("experiments/configs/align_shapesworld.yaml", ["train.max_steps=50", "seeds=[0]"])
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import types
import typing
from pathlib import Path
from typing import Any

import yaml


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key path and the valid choices."""


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` → (["train", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, value = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    return key.split("."), yaml.safe_load(value) if value != "" else ""


def apply_overrides(raw: dict, overrides: list[str]) -> dict:
    """Return a copy of ``raw`` with each ``a.b.c=value`` override set (creating dicts as needed)."""
    out = copy.deepcopy(raw)
    for item in overrides:
        path, value = parse_override(item)
        node = out
        for part in path[:-1]:
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {part!r} is a value, not a section")
            node = child
        node[path[-1]] = value
    return out


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls, data: dict | None, where: str = "config"):
    """Build dataclass ``cls`` from a dict, recursing into dataclass-typed fields.

    Unknown keys raise :class:`ConfigError` naming the key path and listing the valid keys.
    """
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise ConfigError(f"{where} must be a mapping, got {type(data).__name__}: {data!r}")
    types_ = _field_types(cls)
    unknown = sorted(set(data) - set(types_))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'{where}.{k}' for k in unknown)}; "
            f"valid keys of {where}: {', '.join(sorted(types_))}"
        )
    kwargs = {}
    for name, value in data.items():
        tp = types_[name]
        if _is_dataclass_type(tp):
            value = from_dict(tp, value, f"{where}.{name}")
        kwargs[name] = _coerce(value, tp, f"{where}.{name}")
    return cls(**kwargs)


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Light type checking: numbers written as YAML strings ('1e-3') become floats; wrong kinds fail."""
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        if len(args) == 1:
            return _coerce(value, args[0], where)
        return value
    if tp is float and isinstance(value, (int, str)) and not isinstance(value, bool):
        try:
            return float(value)
        except ValueError:
            raise ConfigError(f"{where} must be a number, got {value!r}") from None
    if tp is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if tp in (int, bool, str) and not isinstance(value, tp):
        raise ConfigError(f"{where} must be {tp.__name__}, got {value!r}")
    if origin in (list, tuple) and isinstance(value, (int, float, str)):
        return [value]  # "seeds=0" means [0]
    return value


def to_dict(obj) -> dict:
    return dataclasses.asdict(obj)


def check_kwargs(factory, kwargs: dict, where: str, skip: tuple[str, ...] = ()) -> None:
    """Fail if ``kwargs`` has keys that ``factory``'s signature does not accept (listing valid ones)."""
    sig = inspect.signature(factory)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [n for n, p in sig.parameters.items() if n not in ("self", *skip) and p.kind is not p.VAR_POSITIONAL]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise ConfigError(
            f"unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'{where}.{k}' for k in unknown)}; "
            f"valid keys of {where}: {', '.join(valid)}"
        )


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"config file {path} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: invalid YAML: {e}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def config_path(name_or_path: str) -> Path:
    """A config file path, or the name of a bundled config (``align_shapesworld``)."""
    p = Path(name_or_path)
    if p.exists():
        return p
    bundled = Path(__file__).parent / "configs" / (p.name if p.suffix else p.name + ".yaml")
    if bundled.exists():
        return bundled
    known = sorted(q.stem for q in (Path(__file__).parent / "configs").glob("*.yaml"))
    raise FileNotFoundError(f"config {name_or_path!r} is neither a file nor a bundled config ({', '.join(known)})")
