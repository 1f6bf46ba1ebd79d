"""Exact ranks in both directions, as float64 scoring gives them, from one low-precision pass.

One pass over the score matrix in blocks of caption rows, ``S = T~[rows] @ I~.T`` in the filter
precision (bf16 where it is faster, else float32; :mod:`experiments.retrieval.precision`), each
block used for both directions:

* text → image: the exact float64 score ``t_j`` of caption ``j`` with its image is known before
  the pass; the block counts ``S[j] > t_j + delta_j`` (certainly above) and
  ``S[j] >= t_j - delta_j`` (not certainly below);
* image → text: the same against each image's best true score (with ``with_map``: each of its true
  scores, one slot per caption), counted down the columns.

Items between the two bounds (the band; on the benchmark's data about one comparison in 170,000 with
the float32 filter, one in 600 with bf16) are re-scored in float64 and compared exactly, so an item strictly above, tied
with, or below the true item is classified exactly as float64 scoring would, and the true items
themselves (whose float64 scores are known) are never re-scored. Memory: the filter copy of the
images plus one block; captions are read block by block (a memmap larger than RAM is fine).
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from .inputs import (
    _DEFAULT_NAMES,
    DEFAULT_MEMORY_BUDGET,
    DEGENERATE_MODES,
    TIE_MODES,
    ArrayLike,
    Rows,
    balanced_chunks,
    caption_index,
    check_option,
    dot64,
    resolve_device,
    validate_ground_truth,
    validate_retrieval_inputs,
)
from .precision import FilterSide, choose_precision, exact_matmul_settings, float32_band, score_bounds
from .ties import TieCounts, image_average_precision, single_average_precision

log = logging.getLogger(__name__)
_PAIRS_PER_CHUNK = 4096  # float64 re-scoring: pairs gathered at a time (2 x 4096 x D x 8 bytes)


@dataclass
class RetrievalRanks:
    """1-based ranks of every query under the tie mode ``ties``.

    ``image_to_text`` [N_img]: rank of each image's best-ranked caption; ``text_to_image``
    [N_text]: rank of each caption's image (float64 expectations in ``"expected"`` mode, whole
    numbers otherwise); ``image_to_text_ap`` [N_img]: average precision over the image's captions
    (``None`` unless asked for). ``*_counts``: the :class:`TieCounts` behind the ranks (``None``
    when the ranks were built elsewhere; they are then taken as they are). ``precision``: the
    filter GEMM's; ``n_rescored``: comparisons re-scored in float64; ``text_to_image_ap``
    [N_text]: ``E[1 / rank]`` (``None`` unless asked for; else ``1 / rank`` is used).
    """

    image_to_text: np.ndarray
    text_to_image: np.ndarray
    image_to_text_ap: np.ndarray | None = None
    ties: str = "expected"
    image_to_text_counts: TieCounts | None = None
    text_to_image_counts: TieCounts | None = None
    precision: str = "fp32"
    n_rescored: int = 0
    text_to_image_ap: np.ndarray | None = None


def _slot_thresholds(pair: np.ndarray, caps: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` best true scores of each image, descending: [m, N_img] float64, ``+inf`` padding."""
    vals = np.where(caps >= 0, pair[np.maximum(caps, 0)], -np.inf)
    vals = -np.sort(-vals, axis=1)[:, :m]
    vals[np.isneginf(vals)] = np.inf
    return np.ascontiguousarray(vals.T)


class _Counter:
    """Counts, for one block ``S`` [n, N_img] float32, per row the entries above ``hi`` and at least
    ``lo`` (text → image) and per column and slot the same against the image bands. On CPU in
    numpy (its SIMD compare-and-count is several times faster than torch's), split over ``pool``'s
    threads in row groups that stay in cache; elsewhere in torch."""

    SUB_ROWS = 32  # <= 255: a group's column counts fit uint8

    def __init__(self, rows: int, cols: int, lo_i: np.ndarray, hi_i: np.ndarray, use_numpy: bool,
                 device: torch.device, pool: ThreadPoolExecutor | None, n_parts: int) -> None:
        self.use_numpy, self.pool = use_numpy, pool
        self.m = len(lo_i)
        if use_numpy:
            self.lo_i, self.hi_i = lo_i, hi_i
            n_parts = n_parts if pool is not None else 1
            self.masks = [np.empty((min(rows, self.SUB_ROWS), cols), dtype=bool) for _ in range(n_parts)]
        else:
            self.lo_i, self.hi_i = (torch.from_numpy(a).to(device) for a in (lo_i, hi_i))

    def __call__(self, S: torch.Tensor, lo_t: np.ndarray, hi_t: np.ndarray):
        """Returns (row_gt [n], row_ge [n], col_gt [m, N], col_ge [m, N]) as int64 numpy arrays."""
        n, ncol = S.shape
        if not self.use_numpy:
            lo, hi = (torch.from_numpy(a).to(S.device)[:, None] for a in (lo_t, hi_t))
            row_gt, row_ge = (S > hi).sum(1), (S >= lo).sum(1)
            col_gt = torch.stack([(S > self.hi_i[k]).sum(0) for k in range(self.m)])
            col_ge = torch.stack([(S >= self.lo_i[k]).sum(0) for k in range(self.m)])
            return tuple(x.cpu().numpy().astype(np.int64) for x in (row_gt, row_ge, col_gt, col_ge))
        Sn = S.numpy()
        row_gt, row_ge = np.empty(n, dtype=np.int64), np.empty(n, dtype=np.int64)
        parts = balanced_chunks(n, math.ceil(n / len(self.masks)))
        accs = [np.zeros((2, self.m, ncol), dtype=np.int32) for _ in parts]
        jobs = [(Sn, lo_t, hi_t, row_gt, row_ge, a, b, mask, acc)
                for (a, b), mask, acc in zip(parts, self.masks, accs)]
        if len(jobs) == 1:
            self._count(*jobs[0])
        else:
            for f in [self.pool.submit(self._count, *job) for job in jobs]:
                f.result()
        total = np.sum(accs, axis=0, dtype=np.int64)
        return row_gt, row_ge, total[0], total[1]

    def _count(self, S, lo_t, hi_t, row_gt, row_ge, start, stop, mask_buf, acc) -> None:
        # a whole-array count_nonzero per row is several times faster than count_nonzero(axis=1)
        for s in range(start, stop, self.SUB_ROWS):
            e = min(stop, s + self.SUB_ROWS)
            sub, mask = S[s:e], mask_buf[: e - s]
            np.greater(sub, hi_t[s:e, None], out=mask)
            row_gt[s:e] = [np.count_nonzero(r) for r in mask]
            np.greater_equal(sub, lo_t[s:e, None], out=mask)
            row_ge[s:e] = [np.count_nonzero(r) for r in mask]
            for k in range(self.m):
                np.greater(sub, self.hi_i[k], out=mask)
                acc[0, k] += np.add.reduce(mask.view(np.uint8), axis=0, dtype=np.uint8)
                np.greater_equal(sub, self.lo_i[k], out=mask)
                acc[1, k] += np.add.reduce(mask.view(np.uint8), axis=0, dtype=np.uint8)


def _exact_compare(T: Rows, I: Rows, text_rows: np.ndarray, images: np.ndarray,
                   thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Float64 scores of the pairs (``text_rows[p]``, ``images[p]``) vs ``thresholds[p]``:
    (above [P] bool, equal [P] bool)."""
    above = np.empty(len(text_rows), dtype=bool)
    equal = np.empty(len(text_rows), dtype=bool)
    for s in range(0, len(text_rows), _PAIRS_PER_CHUNK):
        e = s + _PAIRS_PER_CHUNK
        sc = dot64(T.get(text_rows[s:e]), I.get(images[s:e]))
        above[s:e], equal[s:e] = sc > thresholds[s:e], sc == thresholds[s:e]
    return above, equal


def _band(S: torch.Tensor, index: np.ndarray, lo: np.ndarray, hi: np.ndarray, axis: int):
    """Entries of rows (``axis=0``) or columns (``axis=1``) ``index`` of ``S`` within ``[lo, hi]``
    (per selected row/column): (block row [P], image column [P]) int64."""
    idx = torch.from_numpy(index).to(S.device)
    sub = S.index_select(axis, idx)
    shape = (-1, 1) if axis == 0 else (1, -1)
    lo_t, hi_t = (torch.from_numpy(a).to(S.device).reshape(shape) for a in (lo, hi))
    r, c = ((sub >= lo_t) & (sub <= hi_t)).nonzero(as_tuple=True)
    r, c = r.cpu().numpy(), c.cpu().numpy()
    return (index[r], c) if axis == 0 else (r, index[c])


@torch.no_grad()
def retrieval_ranks(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    *,
    normalize: bool = True,
    with_map: bool = False,
    ties: str = "expected",
    degenerate: str = "error",
    precision: str = "auto",
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device | None = None,
    input_names: Sequence[str] = _DEFAULT_NAMES,
    progress: bool | None = None,
    _torch_counting: bool = False,
) -> RetrievalRanks:
    """Exact ranks in both directions from ``image_emb`` [N_img, D], ``text_emb`` [N_text, D] and
    ``text_to_image`` [N_text] (image row of each caption row), as float64 scoring gives them.

    ``ties``: ``"expected"``, ``"pessimistic"`` or ``"optimistic"`` (:mod:`experiments.retrieval.ties`).
    ``degenerate``: ``"error"`` (zero-norm rows raise, naming the array and first row) or ``"tie"``
    (they score 0 against everything). ``precision``: ``"auto"`` (bf16 on CUDA and on CPUs where it
    is faster, else float32), ``"bf16"`` or ``"fp32"``: only the speed depends on it.
    Inputs may be numpy arrays (memory-mapped too) or tensors; ``device`` defaults to that of a
    tensor input, else CPU. Blocks hold ``chunk_size`` caption rows (default: as many as fit
    ``memory_budget`` bytes of float32 scores plus their mask). ``with_map`` adds one band per
    caption slot (max captions per image) for the image → text average precision.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    check_option(ties, TIE_MODES, "ties")
    check_option(degenerate, DEGENERATE_MODES, "degenerate")
    g = np.array(validate_retrieval_inputs(image_emb, text_emb, text_to_image, names=input_names))  # writable
    dev = resolve_device(device, image_emb, text_emb)
    prec = choose_precision(precision, dev)
    If = FilterSide(image_emb, input_names[0], normalize, degenerate, prec, dev)
    Ir = If.rows
    pair = np.empty(len(g))  # exact thresholds, text -> image: float64 score of each true pair

    def pair_scores(s: int, exact: np.ndarray) -> None:
        pair[s : s + len(exact)] = dot64(exact, Ir.get(g[s : s + len(exact)]))

    Tf = FilterSide(text_emb, input_names[1], normalize, degenerate, prec, dev, visit=pair_scores)
    Tr = Tf.rows
    n_img, n_txt, dim = Ir.n, Tr.n, int(image_emb.shape[1])
    bf16_out = prec == "bf16"  # torch.mm of bf16 returns bf16 (CUDA's out_dtype is not used)
    caps = caption_index(g, n_img)
    m = caps.shape[1] if with_map else 1

    thr = _slot_thresholds(pair, caps, m)  # [m, N_img], image -> text
    lo_t, hi_t = float32_band(pair, score_bounds(Tf, If, dim, bf16_out))
    lo_i, hi_i = float32_band(thr, score_bounds(If, Tf, dim, bf16_out)[None, :])

    per_entry = 5 + (2 if bf16_out else 0)
    rows = int(chunk_size) if chunk_size else max(1, int(memory_budget) // (per_entry * n_img))
    chunks = balanced_chunks(n_txt, min(rows, n_txt))
    t2i_above, t2i_tied = np.empty(n_txt, dtype=np.int64), np.empty(n_txt, dtype=np.int64)
    i2t_above, i2t_tied = np.zeros((m, n_img), dtype=np.int64), np.zeros((m, n_img), dtype=np.int64)
    n_rescored = 0
    use_numpy = dev.type == "cpu" and not _torch_counting
    n_threads = torch.get_num_threads() if use_numpy else 1
    log.debug("retrieval: %d images x %d captions, %s filter, %d blocks of <= %d rows",
              n_img, n_txt, prec, len(chunks), rows)
    with exact_matmul_settings(dev), (
            ThreadPoolExecutor(n_threads) if n_threads > 1 else contextlib.nullcontext()) as pool:
        gallery = If.tensor(slice(None))
        counter = _Counter(max(e - s for s, e in chunks), n_img, lo_i, hi_i, use_numpy, dev, pool, n_threads)
        buf = torch.empty(max(e - s for s, e in chunks), n_img, device=dev)
        for s, e in tqdm(chunks, desc="retrieval", unit="block", leave=False,
                         disable=None if progress is None else not progress):
            n = e - s
            if bf16_out:
                S = buf[:n].copy_(torch.mm(Tf.tensor(slice(s, e)), gallery.T))
            else:
                S = torch.mm(Tf.tensor(slice(s, e)), gallery.T, out=buf[:n])
            row_gt, row_ge, col_gt, col_ge = counter(S, lo_t[s:e], hi_t[s:e])
            gb, pb = g[s:e], pair[s:e]

            # text -> image: the band holds the true image itself; re-score the others
            t2i_above[s:e], t2i_tied[s:e] = row_gt, 1
            band_rows = np.flatnonzero(row_ge - row_gt > 1)
            if len(band_rows):
                r, c = _band(S, band_rows, lo_t[s:e][band_rows], hi_t[s:e][band_rows], axis=0)
                keep = c != gb[r]
                r, c = r[keep], c[keep]
                up, eq = _exact_compare(Tr, Ir, s + r, c, pb[r])
                t2i_above[s:e] += np.bincount(r[up], minlength=n)
                t2i_tied[s:e] += np.bincount(r[eq], minlength=n)
                n_rescored += len(r)

            # image -> text: true captions in the band are classified from their known scores
            v = S[torch.arange(n, device=S.device), torch.from_numpy(gb).to(S.device)].float().cpu().numpy()
            i2t_above += col_gt
            for k in range(m):
                in_band = (v >= lo_i[k, gb]) & (v <= hi_i[k, gb])
                own = np.bincount(gb[in_band], minlength=n_img)
                i2t_above[k] += np.bincount(gb[in_band & (pb > thr[k, gb])], minlength=n_img)
                i2t_tied[k] += np.bincount(gb[in_band & (pb == thr[k, gb])], minlength=n_img)
                cols = np.flatnonzero(col_ge[k] - col_gt[k] > own)
                if len(cols):
                    r, c = _band(S, cols, lo_i[k, cols], hi_i[k, cols], axis=1)
                    keep = gb[r] != c
                    r, c = r[keep], c[keep]
                    up, eq = _exact_compare(Tr, Ir, s + r, c, thr[k, c])
                    i2t_above[k] += np.bincount(c[up], minlength=n_img)
                    i2t_tied[k] += np.bincount(c[eq], minlength=n_img)
                    n_rescored += len(r)

    t2i_counts = TieCounts(above=t2i_above, tied=t2i_tied, true_tied=np.ones(n_txt, dtype=np.int64))
    true_scores = np.where(caps >= 0, pair[np.maximum(caps, 0)], -np.inf)  # all captions, not m slots
    i2t_counts = TieCounts(above=i2t_above[0].copy(), tied=i2t_tied[0].copy(),
                           true_tied=(true_scores == thr[0][:, None]).sum(1))
    ap = image_average_precision(thr, i2t_above, i2t_tied, ties) if with_map else None
    t2i_ap = single_average_precision(t2i_counts, ties) if with_map else None
    return RetrievalRanks(image_to_text=i2t_counts.rank(ties), text_to_image=t2i_counts.rank(ties),
                          image_to_text_ap=ap, ties=ties, image_to_text_counts=i2t_counts,
                          text_to_image_counts=t2i_counts, precision=prec, n_rescored=n_rescored,
                          text_to_image_ap=t2i_ap)


def ranks_from_scores(i2t_scores: ArrayLike, t2i_scores: ArrayLike, text_to_image: ArrayLike,
                      ties: str = "expected") -> RetrievalRanks:
    """:class:`RetrievalRanks` (with tie counts) from full score matrices [N_img, N_text] that are not
    inner products of embeddings (e.g. re-ranked by a cross-encoder): image → text reads the rows of
    ``i2t_scores`` (an image's rank is that of its best caption), text → image the columns of
    ``t2i_scores``. Ties are scored as in :func:`retrieval_ranks`; no AP."""
    check_option(ties, TIE_MODES, "ties")
    S1 = np.asarray(i2t_scores.detach().cpu() if isinstance(i2t_scores, torch.Tensor) else i2t_scores, np.float64)
    S2 = np.asarray(t2i_scores.detach().cpu() if isinstance(t2i_scores, torch.Tensor) else t2i_scores, np.float64)
    if S1.ndim != 2 or S1.shape != S2.shape:
        raise ValueError(f"i2t_scores {S1.shape} and t2i_scores {S2.shape} must both be [N_images, N_texts]")
    g = validate_ground_truth(text_to_image, S1.shape[0], S1.shape[1],
                              names=("i2t_scores", "t2i_scores", "text_to_image"))
    cols = np.arange(len(g))
    true = S2[g, cols]
    t2i = TieCounts(above=(S2 > true).sum(0), tied=(S2 == true).sum(0), true_tied=np.ones(len(g), dtype=np.int64))
    best = np.full(S1.shape[0], -np.inf)
    np.maximum.at(best, g, S1[g, cols])
    i2t = TieCounts(above=(S1 > best[:, None]).sum(1), tied=(S1 == best[:, None]).sum(1),
                    true_tied=np.bincount(g, weights=S1[g, cols] == best[g], minlength=len(best)).astype(np.int64))
    return RetrievalRanks(image_to_text=i2t.rank(ties), text_to_image=t2i.rank(ties), ties=ties,
                          image_to_text_counts=i2t, text_to_image_counts=t2i, precision="given")
