"""Stratified splits for the real data sets (seeded, per class, never empty for a class with two or more rows)."""
from __future__ import annotations

import numpy as np


def stratified_take(labels: np.ndarray, rows: np.ndarray, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Split ``rows`` into (rest, taken): ``fraction`` of each class's rows taken (shuffled with ``seed``); both sorted
    int64. A class with two or more rows gives at least one row when ``fraction > 0``."""
    if not 0.0 <= fraction < 1.0:
        raise ValueError(f"a split fraction must be in [0, 1), got {fraction}")
    rng = np.random.default_rng(seed)
    taken = []
    for c in np.unique(labels[rows]):
        r = rows[labels[rows] == c]
        r = r[rng.permutation(len(r))]
        k = int(round(fraction * len(r)))
        if fraction > 0 and k == 0 and len(r) >= 2:
            k = 1
        taken.append(r[:k])
    took = np.sort(np.concatenate(taken)).astype(np.int64) if taken else np.zeros(0, np.int64)
    return np.setdiff1d(rows, took).astype(np.int64), took


def train_val_test(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/val/test over all rows: ``test_fraction`` then ``val_fraction`` (both of all rows)."""
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    rest, test = stratified_take(labels, np.arange(len(labels), dtype=np.int64), test_fraction, seed)
    train, val = stratified_take(labels, rest, val_fraction / (1.0 - test_fraction), seed + 1)
    return {"train": train, "val": val, "test": test}
