"""Check a selected part's options at validation (``--dry-run``), before any data, feature or weight loads.

Three checks per part, each failing with a :class:`~experiments.config.ConfigError` that names the config key:

1. **names**: every option is a keyword of the part's constructor (:func:`experiments.config.check_kwargs`);
2. **types**: every option validates against the constructor's type hint (pydantic, lax mode: ``"1e-3"`` for a
   float is fine, ``"abc"`` for an int or a mapping for a string is not);
3. **values**: the part is *built* from small dummy dimensions (:data:`DRY_DIM`), so whatever its constructor
   checks (``n_components >= 1``, ``heads`` dividing ``embed_dim``, ...) fails now rather than after the caches
   load. The build runs on PyTorch's ``meta`` device (no memory, no initialisation cost), with the network off
   (a part that would fetch weights is checked up to that point) and the global RNGs restored afterwards. Only
   ``ValueError``, ``TypeError``, ``KeyError`` and ``AssertionError`` from the build count as a bad option; any
   other exception (a missing weight file, an operation the meta device lacks) is logged and left to the real
   build, which reports it.

The dummy dimension is highly divisible (10080 = 2⁵·3²·5·7), so an option that must divide the data's feature
size (attention heads) passes whenever some real feature size could take it.
"""
from __future__ import annotations

import contextlib
import logging
import random
import socket
import sys
import typing
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch

from experiments.config import ConfigError, check_kwargs

log = logging.getLogger(__name__)

__all__ = ["DRY_DIM", "check_aligner_options", "check_build", "check_connector_options", "check_fusion_options",
           "check_types", "dry_build"]

#: the feature size every dummy input gets (divisible by 1-10, 12, 14-16, 18, 20, 21, 24, 28, 30, 32, ...)
DRY_DIM = 10080
#: the LM depth a dummy connector is built for (SmolLM2-135M has 30 layers; divisible by 1-6, 10, 12, 15, 20, 30)
DRY_LM_LAYERS = 60
DRY_CLASSES = 3
OPTION_ERRORS = (ValueError, TypeError, KeyError, AssertionError)


def check_types(factory: Callable[..., Any], options: Mapping[str, Any], where: str,
                skip: tuple[str, ...] = ()) -> None:
    """Validate each option against ``factory``'s type hint (pydantic, lax); unannotated ones are not checked."""
    from pydantic import ConfigDict, TypeAdapter, ValidationError

    target = factory.__init__ if isinstance(factory, type) else factory
    try:
        hints = typing.get_type_hints(target)
    except Exception:  # an unresolvable annotation (a name only imported under TYPE_CHECKING): check none
        log.debug("%s: type hints of %r not resolvable; option types not checked", where, factory)
        return
    for key, value in options.items():
        hint = hints.get(key)
        if key in skip or hint is None or hint is typing.Any:
            continue
        try:
            adapter = TypeAdapter(hint, config=ConfigDict(arbitrary_types_allowed=True))
        except Exception:  # a type pydantic cannot build a schema for: left to the build check
            continue
        try:
            adapter.validate_python(value)
        except ValidationError as e:
            msg = e.errors()[0]["msg"] if e.errors() else str(e)
            raise ConfigError(f"{where}.{key}: {msg} (got {value!r}; the constructor takes "
                              f"{_type_name(hint)})") from None


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


@contextlib.contextmanager
def dry_build() -> Iterator[None]:
    """Build parts cheaply and without side effects: ``meta`` device, no network (sockets refuse at once and the
    Hugging Face hub is put in offline mode, so nothing retries), no log records or warnings, global RNGs
    restored."""

    def no_network(*args: Any, **kwargs: Any) -> Any:
        raise socket.gaierror(socket.EAI_NONAME, "no network while checking part options (--dry-run)")

    np_state, py_state = np.random.get_state(), random.getstate()
    saved_socket = (socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex)
    hub = sys.modules.get("huggingface_hub.constants")
    hub_offline = getattr(hub, "HF_HUB_OFFLINE", None)
    log_disable = logging.root.manager.disable
    socket.getaddrinfo = no_network  # type: ignore[assignment]
    socket.socket.connect = socket.socket.connect_ex = no_network  # type: ignore[method-assign]
    if hub is not None:
        hub.HF_HUB_OFFLINE = True
    logging.disable(logging.CRITICAL)
    try:
        with torch.random.fork_rng(devices=[]), torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "copying from a non-meta parameter ... is a no-op"
            yield
    finally:
        logging.disable(log_disable)
        if hub is not None:
            hub.HF_HUB_OFFLINE = hub_offline
        socket.getaddrinfo, socket.socket.connect, socket.socket.connect_ex = saved_socket  # type: ignore[misc]
        np.random.set_state(np_state)
        random.setstate(py_state)


def check_build(build: Callable[[], Any], where: str) -> Any:
    """Run ``build()`` under :func:`dry_build`, then the built part's own parameter check if it has one in the
    scikit-learn way (``_check_params()``, or ``_validate_params()`` with ``_parameter_constraints``: estimators
    check at ``fit``, not in the constructor); an option error becomes a ConfigError naming ``where``.

    Returns the built object, or None when the build stopped for a reason that is not an option error."""
    try:
        with dry_build():
            part = build()
            if callable(getattr(part, "_check_params", None)):
                part._check_params()
            if hasattr(part, "_parameter_constraints") and callable(getattr(part, "_validate_params", None)):
                part._validate_params()
            return part
    except OPTION_ERRORS as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        raise ConfigError(f"{where}: {msg}") from None
    except RuntimeError as e:
        if "negative dimension" in str(e):  # a negative size option reached a layer: torch says so this way
            raise ConfigError(f"{where}: {e} (a size option is negative)") from None
        log.info("%s: options checked up to %s: %s", where, type(e).__name__, e)
        return None
    except Exception as e:  # not the options' fault: the real build will say
        log.info("%s: options checked up to %s: %s", where, type(e).__name__, e)
        return None


def dummy_dims(inputs: Mapping[str, str]) -> tuple[dict[str, int], dict[str, Any]]:
    """(dims, constructor context) for an aligner's declared ``inputs`` (``class`` inputs get class embeddings)."""
    dims: dict[str, int] = {}
    context: dict[str, Any] = {}
    for key, kind in inputs.items():
        dims[key] = 0 if kind in ("pixels", "raw", "class") else DRY_DIM
        if kind == "class":
            context["class_embeddings"] = torch.zeros(DRY_CLASSES, DRY_DIM, device="cpu")
    return dims, context


@contextlib.contextmanager
def _in(source: str) -> Iterator[None]:
    """Prefix a ConfigError with the config's source (file name), as the other config errors are."""
    try:
        yield
    except ConfigError as e:
        raise ConfigError(f"{source}: {e}" if source else str(e)) from None


def check_aligner_options(name: str, options: Mapping[str, Any], where: str, source: str = "") -> None:
    """Names, types and values of aligner ``name``'s options (``where``: the config key, ``aligners.<name>``;
    ``source``: the config file, prefixed to the message)."""
    with _in(source):
        _check_aligner(name, options, where)


def _check_aligner(name: str, options: Mapping[str, Any], where: str) -> None:
    from align.base import ALIGNERS

    cls = ALIGNERS.get(name)
    auto = tuple(getattr(cls, "auto_inputs", ()))
    check_kwargs(cls.__init__, options, where, skip=auto)
    check_types(cls, options, where, skip=auto)
    dims, context = dummy_dims(cls.inputs)
    check_build(lambda: cls.from_inputs(dims, **context, **options), where)


def check_fusion_options(cls: Any, options: Mapping[str, Any], where: str, source: str = "",
                         modalities: tuple[str, ...] = ()) -> None:
    """Types and values of a fusion strategy's (or the unimodal baseline's) options; names are checked by the
    runner. ``modalities``: the dummy modalities (default: the class's ``required_modalities`` or two)."""
    with _in(source):
        _check_fusion(cls, options, where, modalities)


def _check_fusion(cls: Any, options: Mapping[str, Any], where: str, modalities: tuple[str, ...]) -> None:
    import fusion

    mods = tuple(getattr(cls, "required_modalities", ()) or modalities or ("view_a", "view_b"))
    options = dict(options)
    check_types(cls, {k: v for k, v in options.items() if not isinstance(v, Mapping)}, where,
                skip=("in_dim", "in_dims", "num_classes", "modality"))
    for k in ("estimator", "final_estimator"):
        if isinstance(options.get(k), Mapping):
            _check_logistic_regression(dict(options[k]), f"{where}.{k}")
    in_dims = {m: DRY_DIM for m in mods}
    check_build(lambda: fusion.build_strategy(cls, in_dims, DRY_CLASSES, 0, **options), where)


def _check_logistic_regression(kwargs: dict[str, Any], where: str) -> None:
    """scikit-learn checks estimator parameters at ``fit``; check them now with its own constraints."""
    from sklearn.linear_model import LogisticRegression

    check_kwargs(LogisticRegression, kwargs, where)
    est = LogisticRegression(**kwargs)
    validate = getattr(est, "_validate_params", None)  # scikit-learn >= 1.2
    if validate is not None:
        try:
            validate()
        except (ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e}") from None


def check_connector_options(name: str, options: Mapping[str, Any], where: str, source: str = "") -> None:
    """Names, types and values of connector ``name``'s options (``where``: ``connector_options.<name>``)."""
    with _in(source):
        _check_connector(name, options, where)


def _check_connector(name: str, options: Mapping[str, Any], where: str) -> None:
    from align.connectors import CONNECTORS, build_connector

    factory = CONNECTORS.get(name)
    dims = ("vision_dim", "lm_dim", "num_lm_layers")
    check_kwargs(factory, options, where, skip=dims)
    check_types(factory, options, where, skip=dims)
    check_build(lambda: build_connector(name, vision_dim=DRY_DIM, lm_dim=DRY_DIM, num_lm_layers=DRY_LM_LAYERS,
                                        **options), where)
