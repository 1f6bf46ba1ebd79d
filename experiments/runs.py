"""Reading finished runs back: what a run used (:func:`run_info`) and its trained aligners (:func:`load_aligner`).

A run directory (``out_dir`` of ``alignfuse run``) holds ``config.json`` (the validated config), ``results.json``
and ``units/<part>/seed<k>/`` with ``unit.json`` (part name, options, input dims), the Trainer's ``last.pt`` (final
weights of gradient models) or ``model.npz`` (closed-form models), and ``context.pt`` (constructor tensors such as
class embeddings). Nothing is reverse-engineered from weight shapes: a part is rebuilt from what it was built with.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch


def _read_json(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {path.parent} the out_dir of a finished alignfuse run?")
    return json.loads(path.read_text())


def run_info(run_dir: str | Path) -> dict[str, Any]:
    """The run's experiment, data section, encoders, seeds and the parts that have trained units."""
    run_dir = Path(run_dir)
    cfg = _read_json(run_dir / "config.json")
    units = run_dir / "units"
    parts = sorted({str(p.parent.relative_to(units)) for p in units.glob("**/unit.json")}) if units.is_dir() else []
    return {"experiment": cfg.get("experiment"), "data": cfg.get("data"), "encoders": cfg.get("encoders"),
            "seeds": cfg.get("seeds"), "units": parts, "config": cfg}


def load_aligner(run_dir: str | Path, name: str, seed: int = 0) -> Any:
    """Aligner ``name`` of an align run, trained with ``seed``, rebuilt from its unit and in eval mode."""
    from align.base import ALIGNERS

    run_dir = Path(run_dir)
    info = run_info(run_dir)
    if info["experiment"] != "align":
        raise ValueError(f"{run_dir} is a {info['experiment']!r} run, not an align run")
    unit = run_dir / "units" / name / f"seed{seed}"
    meta = _read_json(unit / "unit.json")
    cls = ALIGNERS.get(meta["aligner"])
    context = torch.load(unit / "context.pt", weights_only=True) if (unit / "context.pt").is_file() else {}
    if (unit / "model.npz").is_file():
        return cls.load(unit / "model.npz")
    model = cls.from_inputs(meta["dims"], **context, **meta["options"])
    if not isinstance(model, torch.nn.Module):
        raise FileNotFoundError(f"{unit} has no model.npz: the closed-form unit did not finish")
    from experiments.checkpoint import load_checkpoint

    model.load_state_dict(load_checkpoint(unit / "last.pt")["model"])
    return model.eval()
