"""Two-view CCA on multi-view data: canonical correlations per view pair, checked against the closed form.

``alignfuse run nutrimouse`` (gene 120 vs lipid 21 on 40 mice, the published ridges) and ``alignfuse run
mfeat_cca`` (every pair of the six UCI Multiple Features views) are bundled configs of this runner. For each pair
of views (``pairs``; null = every pair) it fits :class:`align.cca.CCA` (options in ``cca``) on the ``fit_on`` rows
(``all``, or ``train_val`` to report the same variates' correlations on the held-out ``test`` rows), optionally
with each view standardised on those rows, and reports:

* the training canonical correlations, and with ``reference`` the closed-form regularised CCA at the same
  absolute ridges (:func:`experiments.data.real.nutrimouse.rcca_reference`, R's ``rcc``): its ρ and the largest
  difference between the two solvers' variate correlations;
* with ``loo``, the leave-one-out canonical score (R's ``loo``,
  :func:`experiments.data.real.nutrimouse.loo_score`) with the canonical vectors' signs aligned across folds and
  as the solver returns them.

CCA is closed form: ``seeds`` are not used (the split is fixed by ``data.seed``). Each pair is a unit under
``out_dir/units/pair/<a>-<b>`` (a rerun keeps finished pairs); ``results.json`` and ``report_cca.md`` go to
``out_dir``.
"""
from __future__ import annotations

import itertools
import logging
import time
from pathlib import Path
from typing import Any, Literal, Optional

import numpy as np
from pydantic import Field, StrictBool

from experiments.config import ConfigError, DataSection, PositiveInt, RunConfig, check_kwargs, dump, load_config
from experiments.views import check_data_section

log = logging.getLogger(__name__)


class Config(RunConfig):
    """The CCA experiment (module docstring). ``cca``: :class:`align.cca.CCA` options (``n_components`` null =
    ``min(p, q, n - 1)``); ``show``: canonical correlations per pair in the report."""

    experiment: Literal["cca"] = "cca"
    out_dir: str = "runs/cca"
    data: DataSection = DataSection(name="nutrimouse")
    pairs: Optional[list[tuple[str, str]]] = None
    cca: dict[str, Any] = Field(default_factory=lambda: {"n_components": None, "reg": 1e-3})
    standardise: StrictBool = False
    fit_on: Literal["all", "train_val"] = "all"
    reference: StrictBool = True
    loo: StrictBool = False
    show: PositiveInt = 5
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)


def validate(cfg: Config, where: str = "config") -> Config:
    """Data section and CCA options (through ``align.cca.CCA``'s signature); ConfigError on any problem."""
    from align.cca import CCA

    check_data_section(cfg.data, where)
    check_kwargs(CCA.__init__, cfg.cca, "cca", skip=("modalities",))
    n = cfg.cca.get("n_components")
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ConfigError(f"{where}: cca.n_components must be a positive int or null, got {n!r}")
    for a, b in cfg.pairs or []:
        if a == b:
            raise ConfigError(f"{where}: pairs: a pair needs two different views, got ({a}, {b})")
    return cfg


def load(raw: dict, where: str = "config") -> Config:
    """Validate a raw config dict into a :class:`Config`."""
    return validate(load_config(Config, raw, where), where)


def to_dict(cfg: Config) -> dict[str, Any]:
    return dump(cfg)


def pair_cca(x: np.ndarray, y: np.ndarray, options: dict[str, Any], reference: bool, loo: bool,
             test: tuple[np.ndarray, np.ndarray] | None = None) -> dict[str, Any]:
    """Fit ``align.cca.CCA(**options)`` on ``x`` [n, p], ``y`` [n, q] (float64) and score it (module docstring).
    ``test``: held-out rows of both views, scored with the training variates."""
    from align.cca import CCA
    from experiments.data.real.nutrimouse import loo_score, rcca_reference

    k = options.get("n_components") or min(x.shape[1], y.shape[1], len(x) - 1)
    cca = CCA(**{**options, "n_components": k}).fit(x, y)
    out: dict[str, Any] = {"n_fit": int(len(x)), "dims": [int(x.shape[1]), int(y.shape[1])], "n_components": int(k),
                           "reg_x": float(cca.reg_x_), "reg_y": float(cca.reg_y_),
                           "train": [float(c) for c in cca.correlations_]}
    if test is not None:
        u, v = cca.transform(*test)
        out["test"] = [float(np.corrcoef(u[:, j], v[:, j])[0, 1]) for j in range(k)]
    if reference:
        ref = rcca_reference(x, y, cca.reg_x_, cca.reg_y_, k=k)
        out["reference"] = {"rho": [float(r) for r in ref.cor], "variate_cor": [float(r) for r in ref.variate_cor],
                            "max_abs_diff": float(np.abs(cca.correlations_ - ref.variate_cor).max())}
    if loo:
        out["loo"] = {"aligned": loo_score(x, y, cca.reg_x_, cca.reg_y_, align_signs=True),
                      "unaligned": loo_score(x, y, cca.reg_x_, cca.reg_y_, align_signs=False)}
    return out


def run(cfg: Config) -> dict[str, Any]:
    """Every pair (resumable units); results.json and report_cca.md in ``out_dir``."""
    from experiments.data import load_dataset
    from experiments.report import write_json, write_text_atomic
    from experiments.units import Units, unit_key

    t0 = time.perf_counter()
    out = Path(cfg.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "config.json", to_dict(cfg))
    data = load_dataset(cfg.data.name, **cfg.data.options())
    views = getattr(data, "views", None)
    if not isinstance(views, dict) or len(views) < 2:
        raise ValueError(f"data {cfg.data.name!r} is not multi-view data with two or more views")
    pairs = [tuple(p) for p in cfg.pairs] if cfg.pairs else list(itertools.combinations(views, 2))
    unknown = sorted({m for p in pairs for m in p} - set(views))
    if unknown:
        raise ValueError(f"pairs: unknown view(s) {unknown}; views of {cfg.data.name}: {', '.join(views)}")
    if cfg.fit_on == "all":
        fit_rows, test_rows = np.arange(len(data.labels)), None
    else:
        fit_rows = np.concatenate([data.splits["train"], data.splits["val"]])
        test_rows = data.splits["test"]
    units = Units(out)
    per_pair = []
    for a, b in pairs:
        name = f"pair/{a}-{b}"
        key = unit_key(data.fingerprint, a, b, cfg.cca, cfg.standardise, cfg.fit_on, cfg.reference, cfg.loo)
        res = units.result(name, key)
        if res is None:
            units.start(name, key, {"pair": [a, b], "options": cfg.cca})
            log.info("CCA %s - %s", a, b)
            xa, xb = (views[m].astype(np.float64) for m in (a, b))
            if cfg.standardise:
                xa, xb = (_standardised(v, fit_rows) for v in (xa, xb))
            test = None if test_rows is None else (xa[test_rows], xb[test_rows])
            res = pair_cca(xa[fit_rows], xb[fit_rows], cfg.cca, cfg.reference, cfg.loo, test)
            units.finish(name, key, res)
        per_pair.append({"pair": [a, b], **res})
    results = {"data": {**cfg.data.model_dump(), "fingerprint": data.fingerprint,
                        "views": {m: int(v.shape[1]) for m, v in views.items()}},
               "cca": cfg.cca, "standardise": cfg.standardise, "fit_on": cfg.fit_on, "show": cfg.show,
               "pairs": per_pair, "seconds": round(time.perf_counter() - t0, 1),
               "files": {"results": str(out / "results.json"), "report": str(out / "report_cca.md")}}
    write_json(out / "results.json", results)
    write_text_atomic(out / "report_cca.md", format_results(results) + "\n")
    return results


def _standardised(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return (x - x[rows].mean(0)) / (x[rows].std(0) + 1e-8)


def format_results(results: dict[str, Any]) -> str:
    """One row per pair: the first ``show`` canonical correlations (train, test), the closed-form check, LOO."""
    from experiments.report import markdown_table

    k = results["show"]
    first = results["pairs"][0]
    has_test, has_ref, has_loo = "test" in first, "reference" in first, "loo" in first
    head = ["pair", "n fit", "ridges (x, y)", f"train ρ1..{k}"] + ([f"test ρ1..{k}"] if has_test else [])
    head += ["rcc ρ1..3", "max abs diff vs closed form"] if has_ref else []
    head += ["LOO, signs aligned", "LOO, unaligned"] if has_loo else []
    rows = []
    for p in results["pairs"]:
        r = [f"{p['pair'][0]}–{p['pair'][1]}", p["n_fit"], f"{p['reg_x']:.4g}, {p['reg_y']:.4g}",
             ", ".join(f"{c:.4f}" for c in p["train"][:k])]
        r += [", ".join(f"{c:.4f}" for c in p["test"][:k])] if has_test else []
        if has_ref:
            r += [", ".join(f"{c:.4f}" for c in p["reference"]["rho"][:3]), f"{p['reference']['max_abs_diff']:.1e}"]
        r += [f"{p['loo']['aligned']:.4f}", f"{p['loo']['unaligned']:.4f}"] if has_loo else []
        rows.append(r)
    views = ", ".join(f"{m} {d}" for m, d in results["data"]["views"].items())
    return (f"Two-view CCA on {results['data']['name']} ({views}); fitted on {results['fit_on']} rows"
            f"{', views standardised' if results['standardise'] else ''}.\n\n"
            + markdown_table(head, rows, align="l" + "r" * (len(head) - 1)) + f"\n\n({results['seconds']:.1f} s)")
