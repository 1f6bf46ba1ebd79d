"""Ranks, hit rates and average precision of queries whose true item may be tied.

A query is summarised by three counts over its gallery, from float64 scores: ``above`` (``s``)
items strictly above its best true item, ``tied`` (``g``) items with exactly that score (the true
ones included) and ``true_tied`` (``t >= 1``) true items among them. Where the tie block is placed
is fixed by the tie mode:

* ``"expected"`` (default): the block is ordered uniformly at random, and we report expectations.
  The first true item's position in the block has ``E = (g + 1) / (t + 1)``, so the expected rank is
  ``s + (g + 1) / (t + 1)``; it lies within the first ``j`` places of the block with probability
  ``1 - C(g - t, j) / C(g, j)``, so R@K is the expected hit rate and a model that gives every item
  the same score scores exactly chance;
* ``"pessimistic"``: every non-true tied item comes first (rank ``s + g - t + 1``);
* ``"optimistic"``: the true items come first (rank ``s + 1``, the old convention).

VSE++ (``evaluation.py``: ``numpy.argsort`` of the scores) and CLIP_benchmark (``topk``/sort)
break ties by sort order, i.e. by the position of the items in the gallery, so their results on
tied scores depend on the caption order; ``"expected"`` is what they give on average over orders.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.special import digamma, gammaln


@dataclass
class TieCounts:
    """Per query [n] int64: ``above`` (items strictly above the best true item), ``tied`` (items
    with exactly its score, true ones included) and ``true_tied`` (true items among ``tied``)."""

    above: np.ndarray
    tied: np.ndarray
    true_tied: np.ndarray

    def rank(self, mode: str) -> np.ndarray:
        """1-based rank of the first true item [n] float64 (an expectation in ``"expected"`` mode)."""
        s, g, t = (np.asarray(a, dtype=np.float64) for a in (self.above, self.tied, self.true_tied))
        if mode == "optimistic":
            return s + 1.0
        if mode == "pessimistic":
            return s + g - t + 1.0
        return s + (g + 1.0) / (t + 1.0)

    def hit(self, k: int, mode: str) -> np.ndarray:
        """Probability [n] that a true item is within the top ``k`` (0 or 1 except in expected mode)."""
        if mode != "expected":
            return (self.rank(mode) <= k).astype(np.float64)
        s, g, t = (np.asarray(a, dtype=np.int64) for a in (self.above, self.tied, self.true_tied))
        j = k - s  # places of the tie block within the top k
        out = np.where(j >= g - t + 1, 1.0, 0.0)
        mid = (j >= 1) & (j < g - t + 1)
        if mid.any():
            gm, tm, jm = g[mid].astype(np.float64), t[mid].astype(np.float64), j[mid]
            if k <= 4096:  # C(g - t, j) / C(g, j) = prod_{i<j} (g - t - i) / (g - i), exact to rounding
                miss = np.ones(len(gm))
                for i in range(int(jm.max())):
                    live = i < jm
                    miss[live] *= (gm[live] - tm[live] - i) / (gm[live] - i)
                out[mid] = 1.0 - miss
            else:  # the same ratio through log-gamma
                log_miss = (gammaln(gm - tm + 1) + gammaln(gm - jm + 1) - gammaln(gm - tm - jm + 1)
                            - gammaln(gm + 1))
                out[mid] = -np.expm1(log_miss)
        return out

    def is_tied(self) -> np.ndarray:
        """[n] bool: the best true item shares its score with a non-true item (ties among true items
        change nothing)."""
        return np.asarray(self.tied) > np.asarray(self.true_tied)


def _harmonic_span(s: np.ndarray, g: np.ndarray) -> np.ndarray:
    """``sum_{p=1..g} 1 / (s + p)`` in float64."""
    return digamma(s + g + 1.0) - digamma(s + 1.0)


def group_precision_sum(s, g, t, a, mode: str) -> np.ndarray:
    """Sum of the precisions of the ``t`` true items of a tie block of ``g`` items, after ``s``
    items of which ``a`` are true (arrays, float64). Expected mode: position ``p`` holds a true item
    with probability ``t / g`` and then has ``(p - 1)(t - 1) / (g - 1)`` true items before it in the
    block on average, so the sum is ``t/g sum_p (a + 1 + (p-1)(t-1)/(g-1)) / (s + p)``."""
    s, g, t, a = (np.asarray(x, dtype=np.float64) for x in (s, g, t, a))
    if mode in ("optimistic", "pessimistic"):
        first = s if mode == "optimistic" else s + g - t
        out = np.zeros(np.broadcast(s, g, t, a).shape)
        for q in range(1, int(t.max(initial=0)) + 1):
            live = q <= t
            out += np.divide(a + q, first + q, out=np.zeros_like(out), where=live)
        return out
    h1 = _harmonic_span(s, g)
    h2 = g - (s + 1.0) * h1  # sum_p (p - 1) / (s + p)
    frac = np.divide(t - 1.0, g - 1.0, out=np.zeros_like(g), where=g > 1)
    return t / g * ((a + 1.0) * h1 + frac * h2)


def image_average_precision(thr: np.ndarray, above: np.ndarray, tied: np.ndarray, mode: str) -> np.ndarray:
    """AP per image [N] from its true items' float64 scores ``thr`` [m, N] (descending, ``+inf``
    padding), and for each slot the gallery items strictly ``above`` its score and ``tied`` with it
    (true ones included). True items with equal scores form one tie block, whose precision sum is
    shared equally among its slots."""
    real = np.isfinite(thr)
    vals = np.where(real, thr, -np.inf)
    a = (vals[None, :, :] > vals[:, None, :]).sum(1)  # [m, N]: true items strictly above slot k
    t = (vals[None, :, :] == vals[:, None, :]).sum(1)
    with np.errstate(divide="ignore", invalid="ignore"):  # padding slots, masked below
        share = group_precision_sum(above, np.maximum(tied, 1), np.maximum(t, 1), a, mode) / np.maximum(t, 1)
    return np.where(real, share, 0.0).sum(0) / real.sum(0)


def single_average_precision(counts: TieCounts, mode: str) -> np.ndarray:
    """AP of queries with one true item (text → image): ``E[1 / rank]`` under the tie mode."""
    return group_precision_sum(counts.above, counts.tied, counts.true_tied, 0, mode)
