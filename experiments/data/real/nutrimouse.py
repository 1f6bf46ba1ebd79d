"""nutrimouse (Martin et al. 2007, as shipped with the R package CCA): 40 mice, two views, two labels.

Views: ``gene`` 120 hepatic gene expressions, ``lipid`` 21 hepatic fatty-acid concentrations (percentages);
labels: ``genotype`` (wt, ppar) and ``diet`` (coc, fish, lin, ref, sun), four mice per pair. n = 40 < p = 120, so
CCA needs regularisation; González et al. (J. Stat. Software 23(12), 2008) pick λ1 = 0.008096, λ2 = 0.064 by
leave-one-out. This module also holds the closed-form reference of that regularised CCA (R's ``rcc``: a
generalised eigenproblem with ``var(X) + λ1 I`` and ``var(Y) + λ2 I``) and its leave-one-out score (R's ``loo``),
optionally with the sign of each fold's canonical vectors aligned to the full-data fit.
"""
from __future__ import annotations

import csv
import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from experiments.data.multiview import MultiViewData
from experiments.data.real._split import train_val_test

log = logging.getLogger(__name__)

LAMBDA1, LAMBDA2 = 0.008096, 0.064  # González et al. 2008, chosen there by leave-one-out
LABELS = ("genotype", "diet")


def _read_table(path: Path) -> tuple[list[str], np.ndarray]:
    if not path.is_file():
        raise FileNotFoundError(f"nutrimouse file {path} not found")
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.reader(f))
    if len(rows) < 2:
        raise ValueError(f"{path}: expected a header row and data rows, got {len(rows)} rows")
    header, body = rows[0], rows[1:]
    for i, r in enumerate(body, 2):
        if len(r) != len(header):
            raise ValueError(f"{path}, line {i}: {len(r)} fields but the header has {len(header)}")
    return header, np.asarray(body)


def _numbers(path: Path) -> tuple[list[str], np.ndarray]:
    header, body = _read_table(path)
    try:
        x = body.astype(np.float64)
    except ValueError as e:
        raise ValueError(f"{path}: not all fields are numbers ({e})") from e
    return header, x


def load_nutrimouse(
    path: str | Path | None = None,
    label: str = "genotype",
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    fetch: bool = True,
) -> MultiViewData:
    """Views ``gene`` float32 [40, 120] and ``lipid`` float32 [40, 21]; ``label`` ("genotype" or "diet") as the class
    labels. ``path``: a folder holding gene.csv, lipid.csv, genotype.csv, diet.csv (default: the fetched copy)."""
    from experiments.data.fetch import find_data

    if label not in LABELS:
        raise ValueError(f"label must be one of {', '.join(LABELS)}, got {label!r}")
    root = find_data("nutrimouse", path, fetch_missing=fetch)
    h = hashlib.sha256()
    views = {}
    for name in ("gene", "lipid"):
        _, x = _numbers(root / f"{name}.csv")
        views[name] = x.astype(np.float32)
        h.update((root / f"{name}.csv").read_bytes())
    header, raw = _read_table(root / f"{label}.csv")
    h.update((root / f"{label}.csv").read_bytes())
    if raw.shape[1] != 1:
        raise ValueError(f"{root / f'{label}.csv'}: expected one column, got {header}")
    class_names, y = np.unique(raw[:, 0], return_inverse=True)
    n = len(views["gene"])
    for name, arr in [*views.items(), (label, y)]:
        if len(arr) != n:
            raise ValueError(f"{root}: {name} has {len(arr)} rows but gene has {n}")
    y = y.astype(np.int64)
    splits = train_val_test(y, val_fraction, test_fraction, seed)
    h.update(f"{label}|{val_fraction}|{test_fraction}|{seed}".encode())
    return MultiViewData(views=views, labels=y, class_names=[str(c) for c in class_names], splits=splits,
                         fingerprint=h.hexdigest()[:16], name="nutrimouse")


@dataclass
class RCCA:
    """Regularised CCA as R's ``rcc``: ``cor`` [k] the canonical correlations of the regularised problem (singular
    values), ``xcoef`` [p, k] and ``ycoef`` [q, k] with ``a' (var(X) + λ1 I) a = 1`` (and likewise for b), and
    ``variate_cor`` [k] the plain correlations of the training variates ``Xc a`` and ``Yc b``."""

    cor: np.ndarray
    xcoef: np.ndarray
    ycoef: np.ndarray
    variate_cor: np.ndarray


def rcca_reference(x: np.ndarray, y: np.ndarray, lambda1: float, lambda2: float, k: int | None = None) -> RCCA:
    """Closed-form regularised CCA by the generalised symmetric eigenproblem
    ``Cxy (Cyy + λ2 I)^{-1} Cyx a = ρ² (Cxx + λ1 I) a`` (scipy ``eigh``; covariances with ``n - 1``), float64."""
    from scipy.linalg import eigh, solve

    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    xc, yc = x - x.mean(0), y - y.mean(0)
    cxx = xc.T @ xc / (n - 1) + lambda1 * np.eye(x.shape[1])
    cyy = yc.T @ yc / (n - 1) + lambda2 * np.eye(y.shape[1])
    cxy = xc.T @ yc / (n - 1)
    k = min(x.shape[1], y.shape[1], n - 1) if k is None else k
    m = cxy @ solve(cyy, cxy.T, assume_a="pos")
    vals, vecs = eigh((m + m.T) / 2, cxx)  # vecs' cxx vecs = I
    order = np.argsort(vals)[::-1][:k]
    rho = np.sqrt(np.clip(vals[order], 0.0, None))
    a = vecs[:, order]
    b = solve(cyy, cxy.T @ a, assume_a="pos") / rho  # then b' cyy b = 1
    u, v = xc @ a, yc @ b
    vcor = np.array([np.corrcoef(u[:, j], v[:, j])[0, 1] for j in range(k)])
    return RCCA(cor=rho, xcoef=a, ycoef=b, variate_cor=vcor)


def loo_score(x: np.ndarray, y: np.ndarray, lambda1: float = LAMBDA1, lambda2: float = LAMBDA2,
              align_signs: bool = True) -> float:
    """Leave-one-out canonical score of R's ``loo``: for each row i, fit :func:`rcca_reference` without it and score
    it, ``x_i·a1`` and ``y_i·b1`` (raw rows, first canonical vectors); the score is the correlation of the two score
    vectors over the n rows. R does not fix the sign of (a1, b1) across folds; with ``align_signs`` each fold's pair
    is flipped to agree with the full-data ``a1`` (its dot product with it made positive)."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n = len(x)
    ref = rcca_reference(x, y, lambda1, lambda2, k=1).xcoef[:, 0]
    xs, ys = np.empty(n), np.empty(n)
    for i in range(n):
        keep = np.arange(n) != i
        fit = rcca_reference(x[keep], y[keep], lambda1, lambda2, k=1)
        a, b = fit.xcoef[:, 0], fit.ycoef[:, 0]
        if align_signs and a @ ref < 0:
            a, b = -a, -b
        xs[i], ys[i] = x[i] @ a, y[i] @ b
    return float(np.corrcoef(xs, ys)[0, 1])


if __name__ == "__main__":  # python -m experiments.data.real.nutrimouse: the README's nutrimouse numbers
    import time

    from align.cca import CCA
    from experiments.data.fetch import find_data

    t0 = time.perf_counter()
    root = find_data("nutrimouse", None)
    x, y = _numbers(root / "gene.csv")[1], _numbers(root / "lipid.csv")[1]
    ref = rcca_reference(x, y, LAMBDA1, LAMBDA2)
    cca = CCA(n_components=len(ref.cor), reg_x=LAMBDA1, reg_y=LAMBDA2, reg_mode="absolute").fit(x, y)
    print(f"λ1={LAMBDA1}, λ2={LAMBDA2}; rcc cor (regularised ρ): {np.round(ref.cor[:5], 4).tolist()}")
    print(f"training variate correlations, align.cca.CCA: {np.round(cca.correlations_[:5], 4).tolist()}; max |CCA - "
          f"closed form| over {len(ref.cor)} components: {np.abs(cca.correlations_ - ref.variate_cor).max():.1e}")
    print(f"leave-one-out score: {loo_score(x, y):.4f} with signs aligned across folds, "
          f"{loo_score(x, y, align_signs=False):.4f} without ({time.perf_counter() - t0:.1f} s)")
