"""Export a trained projector so that LLaVA code (or Hugging Face ``transformers``' Llava) can load it.

Two formats, both written atomically (temporary file in the same directory, then ``os.replace``):

``llava`` — what LLaVA's stage-1 pre-training saves and ``--pretrain_mm_mlp_adapter`` reads:

* ``mm_projector.bin``: ``torch.save`` of ``{"model.mm_projector.0.weight", ".0.bias", ".2.weight",
  ".2.bias"}`` for ``mlp2x_gelu`` (``{"model.mm_projector.weight", "model.mm_projector.bias"}`` for
  ``linear``); weights ``[out, in]`` as in ``nn.Linear``.
* ``mm_projector_config.json``: ``mm_projector_type``, ``mm_hidden_size`` (d_v), ``hidden_size``
  (d_lm), ``mm_vision_tower``, ``llm`` and whatever ``extra`` says (e.g. how it was initialised).

``hf`` — the ``multi_modal_projector`` of ``transformers.LlavaForConditionalGeneration``:

* ``multi_modal_projector.safetensors``: ``multi_modal_projector.linear_1.weight/bias`` and
  ``multi_modal_projector.linear_2.weight/bias`` (``mlp2x_gelu`` only: HF's projector is always
  Linear → act → Linear);
* ``multi_modal_projector_config.json``: the ``LlavaConfig`` fields that shape it
  (``projector_hidden_act="gelu"``, ``multimodal_projector_bias=true``, ``vision_config.hidden_size``,
  ``text_config.hidden_size``, ``vision_feature_layer``) plus the same provenance fields.

``load_llava_projector`` / ``load_hf_projector`` read either back into an alignfuse connector.
"""
from __future__ import annotations

import json
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch
from torch import Tensor, nn

from align.connectors import MLPProjector, build_connector

log = logging.getLogger(__name__)

LLAVA_PROJECTOR_FILE = "mm_projector.bin"
LLAVA_CONFIG_FILE = "mm_projector_config.json"
HF_PROJECTOR_FILE = "multi_modal_projector.safetensors"
HF_CONFIG_FILE = "multi_modal_projector_config.json"
LLAVA_PREFIX = "model.mm_projector."
HF_PREFIX = "multi_modal_projector."
FORMATS = ("llava", "hf")


def _atomic(path: Path, write: Callable[[Path], None]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(Path(tmp))
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes the file private; an export is as readable as any file
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def _write_json(path: Path, obj: dict[str, Any]) -> Path:
    return _atomic(path, lambda p: p.write_text(json.dumps(obj, indent=2) + "\n"))


def _check_projector(connector: nn.Module) -> str:
    kind = getattr(connector, "llava_type", None)
    if kind:
        return kind
    raise ValueError(f"only 'linear' and 'mlp2x_gelu' projectors have a LLaVA format, got "
                     f"{getattr(connector, 'name', type(connector).__name__)!r}")


def _plain(state: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: v.detach().cpu().contiguous().clone() for k, v in state.items()}


# ------------------------------------------------------------------------------------------- LLaVA


def llava_state_dict(connector: nn.Module) -> dict[str, Tensor]:
    """The connector's weights under LLaVA's names (``model.mm_projector.*``), on CPU."""
    _check_projector(connector)
    return _plain({LLAVA_PREFIX + k: v for k, v in connector.state_dict().items()})


def export_llava_projector(connector: nn.Module, out_dir: str | Path, vision_encoder: str = "",
                           llm: str = "", extra: dict[str, Any] | None = None) -> Path:
    """Write ``mm_projector.bin`` and ``mm_projector_config.json`` into ``out_dir``; returns the .bin path."""
    kind = _check_projector(connector)
    out = Path(out_dir)
    state = llava_state_dict(connector)
    path = _atomic(out / LLAVA_PROJECTOR_FILE, lambda p: torch.save(state, p))
    _write_json(out / LLAVA_CONFIG_FILE, {
        "format": "llava", "mm_projector_type": kind, "mm_hidden_size": connector.vision_dim,
        "hidden_size": connector.lm_dim, "mm_vision_tower": vision_encoder, "llm": llm, **(extra or {})})
    log.info("exported %s projector (%d → %d) to %s", kind, connector.vision_dim, connector.lm_dim, path)
    return path


def _read_config(directory: Path, name: str) -> dict[str, Any] | None:
    p = directory / name
    return json.loads(p.read_text()) if p.is_file() else None


def load_llava_projector(path: str | Path) -> nn.Module:
    """A ``linear``/``mlp2x_gelu`` connector from an ``mm_projector.bin`` (or the directory holding it).

    The type and sizes come from the sidecar when present, else from the keys and shapes.
    """
    path = Path(path)
    file = path / LLAVA_PROJECTOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no LLaVA projector at {file}")
    state = torch.load(file, map_location="cpu", weights_only=True)
    bad = [k for k in state if not k.startswith(LLAVA_PREFIX)]
    if bad:
        raise ValueError(f"{file}: keys must start with {LLAVA_PREFIX!r}; found {bad[:3]}")
    inner = {k[len(LLAVA_PREFIX):]: v for k, v in state.items()}
    if set(inner) == {"0.weight", "0.bias", "2.weight", "2.bias"}:
        kind, d_lm, d_v = "mlp2x_gelu", *inner["0.weight"].shape
    elif set(inner) == {"weight", "bias"}:
        kind, d_lm, d_v = "linear", *inner["weight"].shape
    else:
        raise ValueError(f"{file}: keys {sorted(state)} are neither LLaVA's linear nor its mlp2x_gelu projector")
    cfg = _read_config(file.parent, LLAVA_CONFIG_FILE)
    if cfg is not None and (cfg.get("mm_projector_type"), cfg.get("mm_hidden_size"), cfg.get("hidden_size")) != (
            kind, d_v, d_lm):
        raise ValueError(f"{file.parent / LLAVA_CONFIG_FILE} says {cfg.get('mm_projector_type')} "
                         f"{cfg.get('mm_hidden_size')} → {cfg.get('hidden_size')}, the weights are {kind} {d_v} → {d_lm}")
    connector = build_connector(kind, d_v, d_lm)
    connector.load_state_dict(inner, strict=True)
    return connector


# ---------------------------------------------------------------------------------- Hugging Face


def hf_state_dict(connector: nn.Module) -> dict[str, Tensor]:
    """``mlp2x_gelu`` weights under ``transformers``' Llava names (``multi_modal_projector.linear_{1,2}.*``)."""
    if _check_projector(connector) != "mlp2x_gelu":
        raise ValueError("transformers' LlavaMultiModalProjector is Linear → GELU → Linear: export a 'mlp2x_gelu' "
                         "connector (a 'linear' one has only the LLaVA format)")
    s = connector.state_dict()
    return _plain({HF_PREFIX + "linear_1.weight": s["0.weight"], HF_PREFIX + "linear_1.bias": s["0.bias"],
                   HF_PREFIX + "linear_2.weight": s["2.weight"], HF_PREFIX + "linear_2.bias": s["2.bias"]})


def export_hf_projector(connector: nn.Module, out_dir: str | Path, vision_encoder: str = "", llm: str = "",
                        extra: dict[str, Any] | None = None) -> Path:
    """Write ``multi_modal_projector.safetensors`` and its config JSON into ``out_dir``; returns the weights path."""
    from safetensors.torch import save_file

    state = hf_state_dict(connector)
    out = Path(out_dir)
    path = _atomic(out / HF_PROJECTOR_FILE, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
    _write_json(out / HF_CONFIG_FILE, {
        "format": "hf", "projector_hidden_act": "gelu", "multimodal_projector_bias": True,
        "vision_feature_layer": -1, "vision_config": {"hidden_size": connector.vision_dim},
        "text_config": {"hidden_size": connector.lm_dim}, "mm_vision_tower": vision_encoder, "llm": llm,
        **(extra or {})})
    log.info("exported mlp2x_gelu projector (%d → %d) in transformers' Llava format to %s",
             connector.vision_dim, connector.lm_dim, path)
    return path


def load_hf_projector(path: str | Path) -> MLPProjector:
    """A ``mlp2x_gelu`` connector from ``multi_modal_projector.safetensors`` (or its directory)."""
    from safetensors.torch import load_file

    path = Path(path)
    file = path / HF_PROJECTOR_FILE if path.is_dir() else path
    if not file.is_file():
        raise FileNotFoundError(f"no Hugging Face Llava projector at {file}")
    state = load_file(str(file))
    names = {"0.weight": "linear_1.weight", "0.bias": "linear_1.bias", "2.weight": "linear_2.weight",
             "2.bias": "linear_2.bias"}
    missing = [HF_PREFIX + v for v in names.values() if HF_PREFIX + v not in state]
    if missing:
        raise ValueError(f"{file}: missing {missing}")
    inner = {k: state[HF_PREFIX + v] for k, v in names.items()}
    d_lm, d_v = inner["0.weight"].shape
    connector = MLPProjector(d_v, d_lm)
    connector.load_state_dict(inner, strict=True)
    return connector


def export_projector(connector: nn.Module, out_dir: str | Path, fmt: str = "llava", **kwargs: Any) -> Path:
    """``export_llava_projector`` (``fmt="llava"``) or ``export_hf_projector`` (``fmt="hf"``)."""
    if fmt == "llava":
        return export_llava_projector(connector, out_dir, **kwargs)
    if fmt == "hf":
        return export_hf_projector(connector, out_dir, **kwargs)
    raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
