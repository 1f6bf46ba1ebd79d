"""Frozen encoders run over whole datasets, with the on-disk feature cache.

``encoder.encode(inputs)`` (:mod:`experiments.encoders`) runs one forward pass; :func:`extract_features` runs an
encoder over a whole dataset in batches (tqdm progress) and caches the result in a :class:`FeatureCache`
(:mod:`experiments.feature_cache`): one ``<kind>.npy`` per output under
``root/<encoder>/<dataset fingerprint>/<split>/``, loaded memory-mapped, plus a ``meta.json`` sidecar (shape, dtype,
size and sha256 of each file) that is written last and marks the entry as complete. Every file is written to a
temporary file in the same directory and ``os.replace``-d, so an interrupted computation never leaves a partial
entry behind, and a damaged entry (0-byte, garbage or swapped file) is recomputed with a warning.

The names of those modules are re-exported here: ``from experiments.features import FeatureCache, build_encoder``.
"""
from __future__ import annotations

import logging
from typing import Any, Sequence

import numpy as np

from experiments.encoders import (  # noqa: F401  (re-exported)
    ENCODERS,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MOBILENET_V2_SHA256,
    Features,
    FrozenEncoder,
    ImageInput,
    MiniLMEncoder,
    MobileNetV2Encoder,
    TextInput,
    build_encoder,
    fuse_conv_bn,
    resize_center_crop,
)
from experiments.encoders_open_clip import OpenClipImageEncoder, OpenClipTextEncoder  # noqa: F401
from experiments.feature_cache import FeatureCache, check_finite  # noqa: F401

log = logging.getLogger(__name__)

__all__ = [
    "ENCODERS", "IMAGENET_MEAN", "IMAGENET_STD", "MOBILENET_V2_SHA256", "FeatureCache", "Features", "FrozenEncoder",
    "MiniLMEncoder", "MobileNetV2Encoder", "OpenClipImageEncoder", "OpenClipTextEncoder", "build_encoder",
    "check_finite", "encode_batched", "extract_features", "fuse_conv_bn", "resize_center_crop",
]


def _take(inputs: Any, index: np.ndarray) -> Any:
    if isinstance(inputs, np.ndarray):
        return inputs[index]
    return [inputs[int(i)] for i in index]


def _concat_padded(parts: list[np.ndarray]) -> np.ndarray:
    """Concatenate along axis 0, zero-padding axis 1 to the longest part (for per-token outputs)."""
    if parts[0].ndim >= 2 and len({p.shape[1] for p in parts}) > 1:
        length = max(p.shape[1] for p in parts)
        parts = [np.pad(p, [(0, 0), (0, length - p.shape[1])] + [(0, 0)] * (p.ndim - 2)) for p in parts]
    return np.concatenate(parts)


def encode_batched(encoder: FrozenEncoder, inputs: Any, batch_size: int = 64,
                   kinds: Sequence[str] | None = None, progress: bool = True, desc: str | None = None) -> Features:
    """Run ``encoder.encode`` over ``inputs`` in batches (in ``encoder.batch_order``); rows in input order.

    Per-token kinds whose length differs between batches are zero-padded to the longest.
    """
    from tqdm.auto import tqdm

    kinds = encoder.check_kinds(kinds)
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = len(inputs)
    if n == 0:
        raise ValueError(f"no {encoder.modality} inputs to encode with {encoder.name!r}")
    order = encoder.batch_order(inputs)
    parts: dict[str, list[np.ndarray]] = {k: [] for k in kinds}
    unit = "img" if encoder.modality == "image" else "txt"
    with tqdm(total=n, desc=desc or encoder.name, unit=unit, disable=None if progress else True) as bar:
        for start in range(0, n, batch_size):
            index = np.arange(start, min(start + batch_size, n))
            batch = inputs[start:start + batch_size] if order is None else _take(inputs, order[index])
            out = encoder.encode(batch, kinds)
            for k in kinds:
                parts[k].append(out[k])
            bar.update(len(index))
    result = {k: _concat_padded(v) for k, v in parts.items()}
    if order is not None:
        for k, arr in result.items():
            unsorted = np.empty_like(arr)
            unsorted[order] = arr
            result[k] = unsorted
    return result


def extract_features(inputs: ImageInput | TextInput, encoder: FrozenEncoder, cache: FeatureCache | None = None,
                     dataset_fingerprint: str | None = None, split: str = "all", batch_size: int = 64,
                     kinds: Sequence[str] | None = None, progress: bool = True) -> Features:
    """Features of ``inputs`` (N images or N texts) from ``encoder``: ``{kind: array with N rows}``.

    With a ``cache``, the result is looked up under (``encoder.name``, ``dataset_fingerprint``,
    ``split``) and only computed on a miss; arrays then come back memory-mapped. ``kinds``
    defaults to ``encoder.default_kinds``. Raises ``ValueError`` on NaN/Inf features or when a
    cached entry has a different number of rows than ``inputs`` (a stale fingerprint).
    """
    kinds = encoder.check_kinds(kinds)
    context = f"encoder {encoder.name!r}, dataset {dataset_fingerprint!r}, split {split!r}"
    desc = f"{encoder.name} [{split}]"

    def compute() -> Features:
        return encode_batched(encoder, inputs, batch_size=batch_size, kinds=kinds, progress=progress, desc=desc)

    if cache is None:
        features = compute()
        check_finite(features, context)
        return features
    if not dataset_fingerprint:
        raise ValueError("extract_features with a cache needs a dataset_fingerprint (e.g. ShapesWorld.fingerprint)")
    features = cache.get_or_compute(encoder.name, dataset_fingerprint, split, compute, kinds)
    n, n_cached = len(inputs), len(next(iter(features.values())))
    if n_cached != n:
        raise ValueError(f"{context}: cached features in {cache.entry_dir(encoder.name, dataset_fingerprint, split)} "
                         f"have {n_cached} rows but {n} inputs were given; the dataset fingerprint does not "
                         "identify these inputs (or remove the entry with FeatureCache.remove)")
    return features
