"""Stratified splits for the real data sets (seeded, per class, never empty for a class with two or more rows)."""
from __future__ import annotations

import numpy as np

from experiments.data._common import stratified_take

__all__ = ["stratified_take", "train_val_test"]


def train_val_test(labels: np.ndarray, val_fraction: float, test_fraction: float, seed: int) -> dict[str, np.ndarray]:
    """Stratified train/val/test over all rows: ``test_fraction`` then ``val_fraction`` (both of all rows)."""
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(f"val_fraction + test_fraction must be < 1, got {val_fraction} + {test_fraction}")
    rest, test = stratified_take(labels, np.arange(len(labels), dtype=np.int64), test_fraction, seed)
    train, val = stratified_take(labels, rest, val_fraction / (1.0 - test_fraction), seed + 1)
    return {"train": train, "val": val, "test": test}
