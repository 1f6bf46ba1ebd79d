"""Compositional hard negatives: does each image's true caption outscore its hard negatives?"""
from __future__ import annotations

import numpy as np
import torch

from .inputs import ArrayLike, _as_index_array, _first_nonfinite_row, _shape, check_finite


def hard_negative_metrics(
    image_emb: ArrayLike,
    pos_text_emb: ArrayLike,
    neg_text_emb: ArrayLike,
    neg_owner: ArrayLike | None = None,
    *,
    normalize: bool = True,
) -> dict[str, float]:
    """Does each image's true caption outscore its hard negatives (strictly)?

    ``image_emb`` and ``pos_text_emb`` [N, D]; ``neg_text_emb`` [N, K, D], or [M, D] with
    ``neg_owner`` [M] giving each negative's image row. Returns ``per_pair`` (percent of
    (image, negative) pairs won; the headline, see :func:`hard_negative_accuracy`),
    ``per_image`` (percent of images, among those with a negative, that beat all of theirs),
    ``n_pairs`` and ``n_images``. Scores in float64.
    """
    si, sp, sn = _shape(image_emb), _shape(pos_text_emb), _shape(neg_text_emb)
    if len(si) != 2 or len(sp) != 2:
        raise ValueError(f"image_emb and pos_text_emb must be 2-D [N, D], got {si} and {sp}")
    if si != sp:
        raise ValueError(f"image_emb has shape {si} but pos_text_emb has {sp}")
    if si[0] == 0:
        raise ValueError("image_emb is empty")
    n, d = si
    if neg_owner is None:
        if len(sn) != 3 or sn[0] != n or sn[2] != d:
            raise ValueError(f"neg_text_emb must be [N={n}, K, D={d}] without neg_owner, got {sn}")
        neg = np.asarray(neg_text_emb.detach().cpu() if isinstance(neg_text_emb, torch.Tensor) else neg_text_emb)
        neg = neg.reshape(n * sn[1], d)
        owner = np.repeat(np.arange(n), sn[1])
    else:
        if len(sn) != 2 or sn[1] != d:
            raise ValueError(f"neg_text_emb must be [M, D={d}] with neg_owner, got {sn}")
        owner = _as_index_array(neg_owner, "neg_owner")
        if len(owner) != sn[0]:
            raise ValueError(f"neg_text_emb has {sn[0]} rows but neg_owner has {len(owner)}")
        bad = np.flatnonzero((owner < 0) | (owner >= n))
        if len(bad):
            raise ValueError(f"neg_owner[{int(bad[0])}] = {int(owner[bad[0]])} is out of range for {n} images")
        neg = neg_text_emb
    if len(owner) == 0:
        raise ValueError("no hard negatives given")
    check_finite(image_emb, "image_emb")
    check_finite(pos_text_emb, "pos_text_emb")
    row = _first_nonfinite_row(neg)
    if row is not None:
        where = f"row {row}" if neg_owner is not None else f"[{row // sn[1]}, {row % sn[1]}]"
        raise ValueError(f"neg_text_emb has non-finite values (NaN or Inf), first at {where}")

    def prep(x: ArrayLike) -> np.ndarray:
        x = np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, dtype=np.float64)
        if normalize:
            x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        return x

    img, pos = prep(image_emb), prep(pos_text_emb)
    pos_score = (img * pos).sum(1)
    wins = np.empty(len(owner), dtype=bool)
    for s in range(0, len(owner), 65536):
        o = owner[s : s + 65536]
        wins[s : s + 65536] = pos_score[o] > (img[o] * prep(neg[s : s + 65536])).sum(1)
    has_neg = np.bincount(owner, minlength=n) > 0
    lost = np.bincount(owner, weights=~wins, minlength=n) > 0
    return {
        "per_pair": 100.0 * float(wins.mean()),
        "per_image": 100.0 * float((~lost[has_neg]).mean()),
        "n_pairs": float(len(owner)),
        "n_images": float(has_neg.sum()),
    }


def hard_negative_accuracy(
    image_emb: ArrayLike,
    pos_text_emb: ArrayLike,
    neg_text_emb: ArrayLike,
    neg_owner: ArrayLike | None = None,
    *,
    normalize: bool = True,
    per: str = "pair",
) -> float:
    """Hard-negative accuracy in percent; ``per="pair"`` (the headline: share of (image, negative)
    pairs where the true caption scores strictly higher) or ``per="image"`` (share of images whose
    true caption beats all of their negatives). Shapes as in :func:`hard_negative_metrics`."""
    if per not in ("pair", "image"):
        raise ValueError(f"per must be 'pair' or 'image', got {per!r}")
    return hard_negative_metrics(image_emb, pos_text_emb, neg_text_emb, neg_owner, normalize=normalize)[f"per_{per}"]

