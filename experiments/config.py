"""Experiment configs: YAML + dotted overrides, validated by pydantic models before any work.

One system for every runner:

* **Models.** A runner's config is a :class:`RunConfig` subclass (pydantic v2, ``extra="forbid"``). Each default
  has one home: the field default in that model. Bundled YAMLs only set what differs; the demo passes overrides.
* **One merge rule** (:func:`load_config`): the raw dict is merged onto the model's defaults, recursing into
  *sections* (fields typed as a :class:`Section`, e.g. ``train``, ``data``, ``robustness``), so a partial section
  keeps the defaults of the keys it does not name. Everything else (lists, free mappings such as ``aligners`` or
  ``strategies``, which *select* parts) is a value and replaces the default. A ``data`` section whose ``name``
  differs from the default's drops the default's loader options (they belonged to the other data source).
* **Checks.** Types and ranges are checked (``StrictInt`` seeds and step counts, ``lr > 0``, ``weight_decay >= 0``,
  ``train.device`` in auto/cpu/mps/cuda[:N], ...); an unknown key fails listing the valid ones; the runner's
  ``validate`` then checks part names and constructor options through the registries. ``--dry-run`` runs all of it.
* ``cache_dir`` lives in one place: the top level of every run config (``null`` = ``$ALIGNFUSE_CACHE`` or
  ``~/.cache/alignfuse``), see :meth:`RunConfig.cache_root`.

The shared training section, for every runner (bridge included)::

    class Config(RunConfig):
        experiment: Literal["mine"] = "mine"
        train: TrainSection = TrainSection(max_steps=200, lr=2e-3)   # this runner's defaults
    cfg = load_config(Config, raw, where="my.yaml")                   # ConfigError on any bad key/value
    trainer = Trainer(cfg.train.trainer_config(seed=0, out_dir=unit_dir))

``load_config(Config, read_yaml(path), overrides=["train.lr=3e-4", "seeds=[0]"])`` applies dotted overrides
(values parsed as YAML) before validating.
"""
from __future__ import annotations

import copy
import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Optional, TypeVar

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, StrictBool, StrictInt, ValidationError, \
    field_validator

__all__ = [
    "ConfigError", "DataSection", "RunConfig", "Section", "TrainSection", "apply_overrides", "check_kwargs",
    "config_path", "dump", "load_config", "parse_override", "read_yaml", "with_overrides",
]


class ConfigError(ValueError):
    """A config key or value is wrong; the message names the key path and the valid choices."""


def _no_bool(v: Any) -> Any:
    if isinstance(v, bool):
        raise ValueError("expected a number, got a boolean")
    return v


Float = Annotated[float, BeforeValidator(_no_bool)]  # "1e-3" (a YAML string) is accepted, true/false are not
PositiveFloat = Annotated[Float, Field(gt=0)]
NonNegFloat = Annotated[Float, Field(ge=0)]
Fraction = Annotated[Float, Field(ge=0, le=1)]
PositiveInt = Annotated[StrictInt, Field(ge=1)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
_DEVICE = re.compile(r"^(auto|cpu|mps|cuda(:\d+)?)$")


class Section(BaseModel):
    """Base of every config model: unknown keys fail, values are re-checked on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class TrainSection(Section):
    """Training options shared by every runner; :meth:`trainer_config` turns them into a ``TrainConfig``.

    ``seed`` and ``out_dir`` are not here: the runner sets them per (part, seed) unit. ``save_every`` (steps)
    bounds the work a killed run loses; the last checkpoint is always written at the end of training.
    """

    max_steps: Optional[PositiveInt] = None
    epochs: PositiveInt = 1
    batch_size: PositiveInt = 64
    lr: PositiveFloat = 1e-3
    weight_decay: NonNegFloat = 0.01
    betas: tuple[Fraction, Fraction] = (0.9, 0.999)
    warmup_steps: NonNegInt = 0
    min_lr_ratio: Fraction = 0.0
    grad_clip: Optional[PositiveFloat] = None
    grad_accum: PositiveInt = 1
    eval_every: Optional[PositiveInt] = None
    early_stopping_patience: Optional[PositiveInt] = None
    monitor: str = "rsum"
    mode: Literal["max", "min"] = "max"
    save_every: Optional[PositiveInt] = 100
    keep_best: StrictBool = True
    device: str = "auto"
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    num_workers: NonNegInt = 0
    log_every: PositiveInt = 10
    progress: StrictBool = True
    drop_last: StrictBool = False
    find_unused_parameters: StrictBool = False

    @field_validator("device")
    @classmethod
    def _device(cls, v: str) -> str:
        if not _DEVICE.match(v):
            raise ValueError(f"must be auto, cpu, mps, cuda or cuda:N, got {v!r}")
        return v

    def trainer_config(self, seed: int, out_dir: str | Path | None = None, **changes: Any):
        """The ``experiments.trainer.TrainConfig`` of one unit (``changes`` override fields, e.g. ``monitor``)."""
        from experiments.trainer import TrainConfig

        return TrainConfig(**{**self.model_dump(), **changes, "seed": int(seed),
                              "out_dir": None if out_dir is None else str(out_dir)})

    def merged(self, override: Mapping[str, Any] | None, where: str = "config", key: str = "train"
               ) -> "TrainSection":
        """This section with a part's partial ``train`` override (at config key ``key``) merged on."""
        if not override:
            return self
        if not isinstance(override, Mapping):
            raise ConfigError(f"{where}: {key} must be a mapping of train options, got {override!r}")
        return load_config(type(self), {**self.model_dump(), **dict(override)}, where=where, prefix=f"{key}.")


class DataSection(Section):
    """Which data to load: ``name`` (a key of ``experiments.data.DATASETS``) plus that loader's options.

    Loader options are extra keys (``n_scenes``, ``path``, ``image_root``, ...), checked by the runner against
    the loader (:func:`experiments.views.check_data_section`) before any work.
    """

    model_config = ConfigDict(extra="allow", validate_assignment=True)
    name: str = "shapesworld"

    def options(self, exclude: tuple[str, ...] = ()) -> dict[str, Any]:
        """The loader options (every key but ``name`` and the runner-level keys in ``exclude``)."""
        return {k: v for k, v in self.model_dump().items() if k != "name" and k not in exclude}


class RunConfig(Section):
    """Fields every runner config has. ``seeds``: distinct non-negative ints; ``out_dir``: checkpoints, per-unit
    results and reports (rerunning the same command resumes there); ``cache_dir``: dataset and feature caches;
    ``plugins``: the user's own modules (names on ``sys.path`` or ``.py`` paths) imported before validation, so
    the parts they register (``@ALIGNERS.register(...)``, ...) can be selected; ``$ALIGNFUSE_PLUGINS``
    (comma separated) adds more (:func:`align.registry.import_plugins`)."""

    experiment: str
    out_dir: str
    cache_dir: Optional[str] = None
    seeds: list[NonNegInt] = Field(default_factory=lambda: [0, 1, 2], min_length=1)
    train: TrainSection = TrainSection()
    plugins: list[str] = Field(default_factory=list, validate_default=True)

    @field_validator("plugins")
    @classmethod
    def _import_plugins(cls, v: list[str]) -> list[str]:
        """Import the user's part modules (and ``$ALIGNFUSE_PLUGINS``) before the runner checks part names."""
        from align.registry import import_plugins, plugin_names

        names = plugin_names(v)
        try:
            import_plugins(names)
        except ImportError as e:
            raise ValueError(str(e)) from None
        return names

    @field_validator("seeds")
    @classmethod
    def _distinct(cls, v: list[int]) -> list[int]:
        if len(set(v)) != len(v):
            raise ValueError(f"seeds must be distinct, got {v}")
        return v

    def cache_root(self) -> Path:
        from align.weights import cache_root

        return Path(self.cache_dir) if self.cache_dir else cache_root()


# ------------------------------------------------------------------------------------------------ loading

M = TypeVar("M", bound=BaseModel)


def _section_type(annotation: Any) -> type[BaseModel] | None:
    """The Section class of a field annotation (``Section`` or ``Optional[Section]``), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        subs = [a for a in typing.get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        return subs[0] if len(subs) == 1 else None
    return None


def merge_onto_defaults(cls: type[BaseModel], defaults: Mapping[str, Any], raw: Mapping[str, Any]) -> dict:
    """The one merge rule (module docstring): recurse into sections, replace everything else."""
    out = copy.deepcopy(dict(defaults))
    for k, v in raw.items():
        field = cls.model_fields.get(k)
        sub = _section_type(field.annotation) if field is not None else None
        base = out.get(k)
        if sub is not None and isinstance(v, Mapping) and isinstance(base, Mapping):
            if issubclass(sub, DataSection) and v.get("name", base.get("name")) != base.get("name"):
                base = {}  # another data source: the default source's options do not apply
            out[k] = merge_onto_defaults(sub, base, v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def _model_at(cls: type[BaseModel], loc: tuple) -> type[BaseModel] | None:
    for part in loc:
        field = cls.model_fields.get(part) if isinstance(part, str) else None
        sub = _section_type(field.annotation) if field is not None else None
        if sub is None:
            return None
        cls = sub
    return cls


def _errors(cls: type[BaseModel], err: ValidationError, where: str, prefix: str = "") -> ConfigError:
    lines = []
    for e in err.errors():
        loc = tuple(e["loc"])
        key = prefix + ".".join(str(p) for p in loc)
        if e["type"] == "extra_forbidden":
            owner = _model_at(cls, loc[:-1])
            valid = ", ".join(sorted(owner.model_fields)) if owner is not None else "?"
            parent = (prefix + ".".join(str(p) for p in loc[:-1])).rstrip(".") or "the top level"
            lines.append(f"unknown key {key}; valid keys of {parent}: {valid}")
        else:
            got = e.get("input")
            shown = not isinstance(got, Mapping) and repr(got) not in e["msg"]
            lines.append(f"{key}: {e['msg']} (got {got!r})" if shown else f"{key}: {e['msg']}")
    return ConfigError(f"{where}: " + "; ".join(lines))


def load_config(cls: type[M], raw: Mapping[str, Any] | None, where: str = "config",
                overrides: list[str] | tuple[str, ...] = (), prefix: str = "") -> M:
    """Validate ``raw`` (after ``overrides``) merged onto ``cls``'s defaults; :class:`ConfigError` on any problem
    (keys named ``prefix`` + their dotted path, e.g. ``prefix="aligners.clip.train."``)."""
    try:
        defaults = cls().model_dump() if _has_all_defaults(cls) else {}
        raw = with_overrides(cls, dict(raw or {}), overrides)
        return cls.model_validate(merge_onto_defaults(cls, defaults, raw))
    except ValidationError as e:
        raise _errors(cls, e, where, prefix) from None


def with_overrides(cls: type[BaseModel], raw: Mapping[str, Any], overrides: list[str] | tuple[str, ...]) -> dict:
    """``raw`` (a config file's dict) with dotted ``overrides`` applied, for config model ``cls``."""
    defaults = cls().model_dump() if _has_all_defaults(cls) else {}
    return apply_overrides(_drop_replaced_sources(cls, dict(raw), defaults, overrides), list(overrides))


def _drop_replaced_sources(cls: type[BaseModel], raw: dict, defaults: Mapping[str, Any], overrides) -> dict:
    """An override ``data.name=<other source>`` drops the file's options for the previous source (the same rule
    as for a partial section naming another source), so ``data.name=karpathy data.path=...`` needs nothing else."""
    out = dict(raw)
    for item in overrides:
        path, value = parse_override(item)
        field = cls.model_fields.get(path[0]) if len(path) == 2 and path[1] == "name" else None
        sub = _section_type(field.annotation) if field is not None else None
        if sub is not None and issubclass(sub, DataSection):
            section = out.get(path[0]) if isinstance(out.get(path[0]), Mapping) else {}
            current = section.get("name", (defaults.get(path[0]) or {}).get("name"))
            if value != current:
                out[path[0]] = {}
    return out


def _has_all_defaults(cls: type[BaseModel]) -> bool:
    return all(not f.is_required() for f in cls.model_fields.values())


def dump(cfg: BaseModel) -> dict[str, Any]:
    """The config as plain JSON types (what ``--dry-run`` prints and ``config.json`` holds)."""
    return cfg.model_dump(mode="json")


def parse_override(item: str) -> tuple[list[str], Any]:
    """``"train.lr=3e-4"`` → (["train", "lr"], 0.0003). Values are parsed as YAML scalars/lists."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} is not of the form key.path=value")
    key, value = item.split("=", 1)
    if not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: the value is not valid YAML ({e})") from None
    return key.split("."), parsed


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


def check_kwargs(factory, kwargs: Mapping[str, Any], where: str, skip: tuple[str, ...] = ()) -> None:
    """Fail if ``kwargs`` has keys that ``factory``'s signature does not accept (listing valid ones)."""
    sig = inspect.signature(factory)
    if any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values()):
        return
    valid = [n for n, p in sig.parameters.items() if n not in ("self", "cls", *skip) and p.kind is not p.VAR_POSITIONAL]
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
        raw = yaml.safe_load(path.read_text()) or {}
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


# ------------------------------------------------------------------ dataclass configs (bridge runner, until it moves)


def _field_types(cls) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _is_dataclass_type(tp: Any) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def from_dict(cls, data: dict | None, where: str = "config"):
    """Build dataclass ``cls`` from a dict, recursing into dataclass-typed fields (kept for the bridge runner's
    dataclass config until it adopts :class:`RunConfig`; new code uses :func:`load_config`).

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
