"""BasicMotions (UEA multivariate archive): 80 smartwatch recordings, 4 activities, two sensors as two modalities.

Each recording is 100 steps (10 s at 10 Hz) of six channels: a 3-axis accelerometer (channels 0-2) and a 3-axis
gyroscope (channels 3-5). :func:`load_basicmotions` returns :class:`MultiViewData` with views ``accelerometer`` and
``gyroscope``, each float32 [N, 3, 100], and the archive's standard split (40 train, 40 test; ``val`` is carved
per class from train). :func:`read_ts` reads sktime's / the UEA archive's ``.ts`` text format.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import numpy as np

from experiments.data.multiview import MultiViewData
from experiments.data.real._split import stratified_take

log = logging.getLogger(__name__)

SENSORS = {"accelerometer": (0, 3), "gyroscope": (3, 6)}
REPRESENTATIONS = ("sequence", "summary")
SUMMARY = ("mean", "std", "min", "max", "median", "mean_abs_diff", "std_diff", "fft_band_1", "fft_band_2",
           "fft_band_3", "fft_band_4", "zero_crossings")


def summarise(x: np.ndarray) -> np.ndarray:
    """Per-channel summary features of sequences [N, C, T] -> float32 [N, C * 12] (channel-major, in the order of
    :data:`SUMMARY`): moments, order statistics, the size of step-to-step changes, the share of spectral energy in
    four equal frequency bands, and the rate of mean crossings. Shift-invariant in time, as activity cues are."""
    x = np.asarray(x, dtype=np.float64)
    d = np.diff(x, axis=2)
    power = np.abs(np.fft.rfft(x - x.mean(2, keepdims=True), axis=2)[:, :, 1:]) ** 2
    bands = np.stack([b.sum(2) for b in np.array_split(power, 4, axis=2)], axis=2)
    bands = bands / np.maximum(bands.sum(2, keepdims=True), 1e-12)
    centred = x - x.mean(2, keepdims=True)
    crossings = (np.signbit(centred[:, :, 1:]) != np.signbit(centred[:, :, :-1])).mean(2)
    feats = np.concatenate([np.stack([x.mean(2), x.std(2), x.min(2), x.max(2), np.median(x, 2),
                                      np.abs(d).mean(2), d.std(2)], axis=2), bands, crossings[:, :, None]], axis=2)
    return feats.reshape(len(x), -1).astype(np.float32)


def read_ts(path: str | Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Read an equal-length multivariate ``.ts`` file: series float64 [N, D, T], labels int64 [N] (indices into the
    class names of the ``@classLabel`` header, in its order), class names. Errors name the file and line."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f".ts file {path} not found")
    classes: list[str] | None = None
    rows, labels = [], []
    in_data = False
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line or line.startswith("#"):
                continue
            if not in_data:
                low = line.lower()
                if low.startswith("@classlabel"):
                    parts = line.split()
                    if len(parts) < 3 or parts[1].lower() != "true":
                        raise ValueError(f"{path}, line {lineno}: expected '@classLabel true <names...>'")
                    classes = parts[2:]
                elif low.startswith("@data"):
                    in_data = True
                continue
            if classes is None:
                raise ValueError(f"{path}, line {lineno}: data before an '@classLabel true ...' header")
            *dims, label = line.split(":")
            if not dims:
                raise ValueError(f"{path}, line {lineno}: expected '<dim 1>:<dim 2>:...:<label>'")
            try:
                series = [[float(v) for v in d.split(",")] for d in dims]
            except ValueError as e:
                raise ValueError(f"{path}, line {lineno}: {e}") from e
            if rows and (len(series) != len(rows[0]) or any(len(s) != len(rows[0][0]) for s in series)):
                raise ValueError(f"{path}, line {lineno}: {len(series)} dimensions of lengths "
                                 f"{sorted({len(s) for s in series})}, but earlier rows have {len(rows[0])} of "
                                 f"length {len(rows[0][0])} (only equal-length series are supported)")
            if len({len(s) for s in series}) != 1:
                raise ValueError(f"{path}, line {lineno}: dimensions of unequal lengths {[len(s) for s in series]}")
            if label.strip() not in classes:
                raise ValueError(f"{path}, line {lineno}: label {label.strip()!r} is not one of {', '.join(classes)}")
            rows.append(series)
            labels.append(classes.index(label.strip()))
    if not rows:
        raise ValueError(f"{path}: no data rows (is there an '@data' line?)")
    x = np.asarray(rows, dtype=np.float64)
    if not np.isfinite(x).all():
        raise ValueError(f"{path}: row {int(np.argmin(np.isfinite(x).reshape(len(x), -1).all(1)))} has NaN or Inf "
                         "(missing values are not supported)")
    return x, np.asarray(labels, dtype=np.int64), list(classes or [])


def load_basicmotions(
    path: str | Path | None = None,
    val_fraction: float = 0.1,
    seed: int = 0,
    representation: str = "sequence",
    fetch: bool = True,
) -> MultiViewData:
    """The two sensors over the 80 recordings; rows 0-39 are the archive's train file, 40-79 its test file.

    ``representation``: ``"sequence"`` (each view float32 [N, 3, 100]) or ``"summary"`` (each view the
    :func:`summarise` features [N, 36]: the fallback for fusion parts that take vectors, not sequences).

    ``val_fraction`` (of all rows) is carved per class from train with ``seed``. ``path``: a folder holding
    ``BasicMotions_TRAIN.ts`` and ``BasicMotions_TEST.ts`` (default: the fetched copy).
    """
    from experiments.data.fetch import find_data

    if representation not in REPRESENTATIONS:
        raise ValueError(f"representation must be one of {', '.join(REPRESENTATIONS)}, got {representation!r}")
    root = find_data("basicmotions", path, fetch_missing=fetch)
    parts = {}
    h = hashlib.sha256()
    for split in ("TRAIN", "TEST"):
        file = root / f"BasicMotions_{split}.ts"
        parts[split] = read_ts(file)
        h.update(file.read_bytes())
    (xtr, ytr, ctr), (xte, yte, cte) = parts["TRAIN"], parts["TEST"]
    if ctr != cte or xtr.shape[1:] != xte.shape[1:]:
        raise ValueError(f"{root}: train and test files disagree (classes {ctr} vs {cte}, "
                         f"shapes {xtr.shape} vs {xte.shape})")
    if xtr.shape[1] != 6:
        raise ValueError(f"{root}: expected 6 channels (3 accelerometer + 3 gyroscope), got {xtr.shape[1]}")
    x = np.concatenate([xtr, xte]).astype(np.float32)
    y = np.concatenate([ytr, yte])
    train = np.arange(len(ytr), dtype=np.int64)
    frac = min(0.5, val_fraction * len(y) / len(train))
    train, val = stratified_take(y, train, frac, seed)
    splits = {"train": train, "val": val, "test": np.arange(len(ytr), len(y), dtype=np.int64)}
    views = {name: np.ascontiguousarray(x[:, a:b]) for name, (a, b) in SENSORS.items()}
    if representation == "summary":
        views = {name: summarise(v) for name, v in views.items()}
    h.update(f"{val_fraction}|{seed}|{representation}".encode())
    log.info("basicmotions: %d recordings, views %s, splits %s", len(y), {k: v.shape[1:] for k, v in views.items()},
             {k: len(v) for k, v in splits.items()})
    return MultiViewData(views=views, labels=y, class_names=ctr, splits=splits, fingerprint=h.hexdigest()[:16],
                         name="basicmotions")
