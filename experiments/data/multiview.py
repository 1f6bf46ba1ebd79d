"""Multi-view data: any number of named modalities over the same N samples, with class labels and splits.

On disk, either

* one ``.npz`` file holding ``labels`` [N] (integers), optionally ``class_names`` [C] (strings), and one array per
  modality under any other key, or
* a directory of ``<modality>.npy`` arrays plus ``labels.npy`` (optionally ``class_names.txt``, one name a line).

A modality is float [N, d] (vectors) or [N, C, T] (sensor channels x time). Splits come from ``split_path``
(or, in a directory, a ``splits.npz`` / ``split.npy`` beside the arrays): ``splits.npz`` holds ``train`` /
``val`` / ``test`` index arrays (``val`` may be absent: it is then carved from ``train``), ``split.npy`` holds
one string per row (``"train"``, ``"val"``, ``"test"``). Without a split file, a stratified split is drawn with
``seed``. Every problem (mismatched N, NaN, non-integer labels, overlapping or out-of-range splits) raises
``ValueError`` naming the file and the shape or row at fault.
"""
from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np

from experiments.data._common import stratified_take

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
_RESERVED = ("labels", "class_names")


@dataclass(eq=False)
class MultiViewData:
    """Named views over N samples: ``views[m]`` float32 [N, d] or [N, C, T], ``labels`` int64 [N] in [0, C),
    ``splits[s]`` sorted disjoint int64 row indices for s in train/val/test."""

    views: dict[str, np.ndarray]
    labels: np.ndarray
    class_names: list[str]
    splits: dict[str, np.ndarray]
    fingerprint: str
    name: str = "multiview"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def modalities(self) -> list[str]:
        return list(self.views)


def _hash_files(paths: Sequence[Path], *extra: str) -> str:
    h = hashlib.sha256()
    for p in paths:
        h.update(p.name.encode() + b"\0")
        with open(p, "rb") as f:
            while chunk := f.read(1 << 20):
                h.update(chunk)
    for e in extra:
        h.update(b"\0" + e.encode())
    return h.hexdigest()[:16]


def _read_arrays(path: Path) -> tuple[dict[str, np.ndarray], dict[str, str], list[Path]]:
    """Arrays by key, where each came from (for messages), and the files read."""
    if path.is_dir():
        files = sorted(path.glob("*.npy"))
        files = [f for f in files if f.stem not in ("split",)]
        if not files:
            raise FileNotFoundError(f"{path}: no <modality>.npy files in this directory")
        arrays, where = {}, {}
        for f in files:
            try:
                arrays[f.stem] = np.load(f, allow_pickle=False)
            except ValueError as e:
                raise ValueError(f"{f} is not a readable .npy array: {e}") from e
            where[f.stem] = str(f)
        names_txt = path / "class_names.txt"
        if names_txt.is_file():
            names = [ln.strip() for ln in names_txt.read_text(encoding="utf-8").splitlines() if ln.strip()]
            arrays["class_names"] = np.asarray(names)
            where["class_names"] = str(names_txt)
            files.append(names_txt)
        return arrays, where, files
    if not path.is_file():
        raise FileNotFoundError(f"multi-view data {path} not found (expected a .npz file or a directory of .npy)")
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (ValueError, OSError) as e:
        raise ValueError(f"{path} is not a readable .npz archive: {e}") from e
    return arrays, {k: f"{path}[{k!r}]" for k in arrays}, [path]


def _check_labels(raw: np.ndarray, where: str, class_names: Sequence[str] | None) -> tuple[np.ndarray, list[str]]:
    if raw.ndim != 1:
        raise ValueError(f"{where}: labels must be 1-d [N], got shape {raw.shape}")
    if raw.dtype == bool or not np.issubdtype(raw.dtype, np.integer):
        raise ValueError(f"{where}: labels must be integers, got dtype {raw.dtype}")
    labels = raw.astype(np.int64)
    if len(labels) and labels.min() < 0:
        raise ValueError(f"{where}: row {int(np.argmin(labels))} has negative label {int(labels.min())}")
    if class_names is not None:
        names = [str(c) for c in class_names]
        if len(labels) and labels.max() >= len(names):
            row = int(np.argmax(labels))
            raise ValueError(f"{where}: row {row} has label {labels[row]} but only {len(names)} class names are given")
        return labels, names
    values = np.unique(labels)
    if np.array_equal(values, np.arange(len(values))):
        return labels, [str(v) for v in values]
    log.info("%s: labels %s remapped to 0..%d", where, values.tolist(), len(values) - 1)
    return np.searchsorted(values, labels).astype(np.int64), [str(v) for v in values]


def _check_view(name: str, arr: np.ndarray, where: str, n: int) -> np.ndarray:
    if arr.ndim not in (2, 3):
        raise ValueError(f"{where}: modality {name!r} must be [N, d] or [N, C, T], got shape {arr.shape}")
    if arr.shape[0] != n:
        raise ValueError(f"{where}: modality {name!r} has {arr.shape[0]} rows (shape {arr.shape}) but labels have {n}")
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)) or arr.dtype == bool:
        raise ValueError(f"{where}: modality {name!r} must hold real numbers, got dtype {arr.dtype}")
    if min(arr.shape[1:]) == 0:
        raise ValueError(f"{where}: modality {name!r} is empty, shape {arr.shape}")
    ok = np.isfinite(arr.reshape(n, -1)).all(axis=1)
    if not ok.all():
        raise ValueError(f"{where}: modality {name!r} row {int(np.argmin(ok))} contains NaN or Inf (shape {arr.shape})")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _read_splits(split_path: Path, n: int) -> dict[str, np.ndarray]:
    if not split_path.is_file():
        raise FileNotFoundError(f"split file {split_path} not found")
    if split_path.suffix == ".npz":
        with np.load(split_path, allow_pickle=False) as z:
            unknown = sorted(set(z.files) - set(SPLITS))
            if unknown or "train" not in z.files or "test" not in z.files:
                raise ValueError(f"{split_path}: expected index arrays train, test (and optionally val), "
                                 f"found {', '.join(z.files) or '(none)'}")
            splits = {}
            for s in z.files:
                idx = z[s]
                if idx.ndim != 1 or not (np.issubdtype(idx.dtype, np.integer) or idx.size == 0) or idx.dtype == bool:
                    raise ValueError(f"{split_path}[{s!r}]: expected 1-d integer row indices, got "
                                     f"shape {idx.shape} dtype {idx.dtype}")
                idx = idx.astype(np.int64)
                bad = np.flatnonzero((idx < 0) | (idx >= n))
                if len(bad):
                    raise ValueError(f"{split_path}[{s!r}]: entry {bad[0]} is row {idx[bad[0]]}, outside [0, {n})")
                if len(np.unique(idx)) != len(idx):
                    raise ValueError(f"{split_path}[{s!r}]: repeated row indices")
                splits[s] = np.sort(idx)
        for i, a in enumerate(SPLITS):
            for b in SPLITS[i + 1:]:
                if a in splits and b in splits:
                    both = np.intersect1d(splits[a], splits[b])
                    if len(both):
                        raise ValueError(f"{split_path}: splits {a!r} and {b!r} overlap ({len(both)} rows, "
                                         f"first row {both[0]})")
        return splits
    try:
        raw = np.load(split_path, allow_pickle=False)
    except ValueError as e:
        raise ValueError(f"{split_path} is not a readable .npy array of split names: {e}") from e
    if raw.ndim != 1 or raw.dtype.kind not in "US":
        raise ValueError(f"{split_path}: expected one split name per row (strings [N]), got shape {raw.shape} "
                         f"dtype {raw.dtype}")
    if len(raw) != n:
        raise ValueError(f"{split_path} has {len(raw)} rows (shape {raw.shape}) but the data has {n}")
    names = raw.astype(str)
    bad = np.flatnonzero(~np.isin(names, SPLITS))
    if len(bad):
        raise ValueError(f"{split_path}: row {bad[0]} has split {str(names[bad[0]])!r}; expected one of {', '.join(SPLITS)}")
    return {s: np.flatnonzero(names == s).astype(np.int64) for s in SPLITS if (names == s).any() or s != "val"}


def load_multiview(
    path: str | Path,
    split_path: str | Path | None = None,
    val_fraction: float = 0.1,
    test_fraction: float = 0.2,
    seed: int = 0,
    class_names: Sequence[str] | None = None,
) -> MultiViewData:
    """Load and validate multi-view arrays (module docstring has the layout).

    Without a split file, ``test_fraction`` then ``val_fraction`` (of all rows) are drawn per class with ``seed``;
    a split file without ``val`` gets ``val_fraction`` of all rows carved from its ``train`` rows.
    """
    path = Path(path)
    for name, f in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        if not 0.0 <= f < 1.0:
            raise ValueError(f"{name} must be in [0, 1), got {f}")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    arrays, where, files = _read_arrays(path)
    if "labels" not in arrays:
        raise ValueError(f"{path}: no 'labels' array (keys found: {', '.join(sorted(arrays)) or '(none)'})")
    if class_names is None and "class_names" in arrays:
        class_names = [str(c) for c in arrays["class_names"].tolist()]
    labels, names = _check_labels(arrays["labels"], where["labels"], class_names)
    n = len(labels)
    if n == 0:
        raise ValueError(f"{where['labels']}: no rows")
    views = {k: _check_view(k, a, where[k], n) for k, a in arrays.items() if k not in _RESERVED}
    if not views:
        raise ValueError(f"{path}: no modality arrays besides labels")
    if split_path is None and path.is_dir():
        for cand in ("splits.npz", "split.npy"):
            if (path / cand).is_file():
                split_path = path / cand
                break
    if split_path is not None:
        split_path = Path(split_path)
        splits = _read_splits(split_path, n)
        files = [*files, split_path]
        if "val" not in splits:
            frac = min(1.0, val_fraction * n / max(1, len(splits["train"])))
            splits["train"], splits["val"] = stratified_take(labels, splits["train"], frac, seed)
    else:
        rest, test = stratified_take(labels, np.arange(n, dtype=np.int64), test_fraction, seed)
        frac = val_fraction / (1.0 - test_fraction)
        train, val = stratified_take(labels, rest, frac, seed + 1)
        splits = {"train": train, "val": val, "test": test}
    splits = {s: splits[s] for s in SPLITS}
    if len(splits["train"]) == 0:
        raise ValueError(f"{split_path or path}: the train split is empty")
    fp = _hash_files(files, str(split_path is None), str(val_fraction), str(test_fraction), str(seed), *names)
    shapes = ", ".join(f"{k} {tuple(v.shape[1:])}" for k, v in views.items())
    log.info("%s: %d rows, %d classes, views %s, splits %s", path, n, len(names), shapes,
             {s: len(i) for s, i in splits.items()})
    return MultiViewData(views=views, labels=labels, class_names=names, splits=splits, fingerprint=fp,
                         name=path.stem if path.is_file() else path.name)


__all__ = ["MultiViewData", "load_multiview"]
