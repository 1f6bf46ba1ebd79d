"""Cross-modal retrieval evaluation: exact ranks in both directions, faiss top-k, hard negatives.

Ground truth is many-to-many as in the VSE++ evaluation and CLIP_benchmark: ``text_to_image[j]``
is the image row of caption row ``j`` and an image may have several captions.

* **image → text**: the image's rank is that of its best-scoring caption;
* **text → image**: the caption's rank is that of its one image;
* a rank is ``1 + #{gallery items scoring strictly higher than the true item}``, so ties are
  resolved in the query's favour.

:func:`retrieval_metrics` returns R@K in percent, median rank (``floor`` of the median, as
VSE++ and ``open_clip_train`` report it) and mean rank (1-based), ``rsum`` (the sum of the
recalls of both directions), optionally mAP (image → text: average precision over all of the
image's captions; text → image: ``1 / rank``) and percentile-bootstrap confidence intervals.

How the ranks are computed (:func:`retrieval_ranks`): one pass over the score matrix in blocks
of caption rows, ``S = T[rows] @ I.T`` (float32 GEMM), each block used for both directions, so
the cost is one matmul plus two compare-and-count sweeps per block (numpy, split over torch's
threads) and memory is one block of ``rows × N_images`` plus the image embeddings; captions are
read block by block, so they may be a memory-mapped array larger than RAM:

* text → image counts ``S[j] > S[j, text_to_image[j]]`` along the row;
* image → text needs each image's best caption score before the pass. It is computed up front
  from small GEMMs over caption/image groups; counts ``S[:, i] > best[i]`` are accumulated over
  the blocks. Scores of the true pairs gathered during the pass check, bit for bit, that the
  threshold equals what the big GEMM computed (BLAS results may depend on the call's shape); any
  image where it does not is recomputed column-wise with its threshold taken from that same
  column, so a true item never counts against itself and exact ties stay ties.

For galleries that do not fit in memory, :class:`FaissRetriever` serves top-k search
(``flat``/``ivf``/``hnsw``), :func:`recall_at_k_from_topk` turns its top-k into R@K and
:func:`faiss_vs_exact_recall` reports how much of the exact top-k it found.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

ArrayLike = Any  # np.ndarray (memory-mapped or not) | torch.Tensor

DEFAULT_KS: tuple[int, ...] = (1, 5, 10)
#: bytes of one block (float32 scores + its boolean mask) when ``chunk_size`` is not given
DEFAULT_MEMORY_BUDGET: int = 256 * 2**20
DIRECTIONS: tuple[str, str] = ("image_to_text", "text_to_image")
SHORT_NAMES: dict[str, str] = {"image_to_text": "i2t", "text_to_image": "t2i"}
_DEFAULT_NAMES = ("image_emb", "text_emb", "text_to_image")
# true-pair scores: GEMMs of up to _PAIR_ROWS captions x _PAIR_COLS images, big enough for the
# BLAS's GEMM path and to amortise each call's thread start-up, small next to the main pass
_PAIR_ROWS = 1024
_PAIR_COLS = 256
_PAIR_MIN_COLS = 64


# --------------------------------------------------------------------------------------------
# validation and small helpers
# --------------------------------------------------------------------------------------------

def _shape(x: ArrayLike) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _first_nonfinite_row(x: ArrayLike, block: int = 65536) -> int | None:
    """Index of the first row of ``x`` [N, ...] holding NaN or Inf, scanning in blocks (memmap-friendly)."""
    for s in range(0, _shape(x)[0], block):
        chunk = x[s : s + block]
        if isinstance(chunk, torch.Tensor):
            bad = ~torch.isfinite(chunk.reshape(len(chunk), -1)).all(1)
            if bool(bad.any()):
                return s + int(bad.nonzero()[0, 0])
        else:
            chunk = np.asarray(chunk)
            if not np.issubdtype(chunk.dtype, np.floating):
                continue
            bad = ~np.isfinite(chunk.reshape(len(chunk), -1)).all(1)
            if bad.any():
                return s + int(np.argmax(bad))
    return None


def check_finite(x: ArrayLike, name: str) -> None:
    """Raise ``ValueError`` naming ``name`` and the first row holding NaN or Inf."""
    row = _first_nonfinite_row(x)
    if row is not None:
        raise ValueError(f"{name} has non-finite values (NaN or Inf), first in row {row}")


def _as_index_array(x: ArrayLike, name: str) -> np.ndarray:
    arr = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else np.asarray(x)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be a 1-D integer array, got shape {arr.shape}")
    if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
        raise ValueError(f"{name} must hold integer indices, got dtype {arr.dtype}")
    return arr.astype(np.int64, copy=False)


def validate_ground_truth(
    text_to_image: ArrayLike,
    n_images: int,
    n_texts: int,
    *,
    names: Sequence[str] = _DEFAULT_NAMES,
) -> np.ndarray:
    """``text_to_image`` as int64 [N_text] after checking its length, its range and that every image
    has a caption (``names``: image, text and ground-truth names used in the messages)."""
    n_img, n_txt, n_map = names
    g = _as_index_array(text_to_image, n_map)
    if len(g) != n_texts:
        raise ValueError(f"{n_txt} has {n_texts} rows but {n_map} has {len(g)}")
    bad = np.flatnonzero((g < 0) | (g >= n_images))
    if len(bad):
        j = int(bad[0])
        raise ValueError(f"{n_map}[{j}] = {int(g[j])} is out of range for {n_images} images in {n_img} "
                         f"({len(bad)} bad entries)")
    orphans = np.flatnonzero(np.bincount(g, minlength=n_images) == 0)
    if len(orphans):
        raise ValueError(f"image row {int(orphans[0])} of {n_img} has no caption in {n_map} "
                         f"({len(orphans)} images without captions)")
    return g


def validate_retrieval_inputs(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    *,
    names: Sequence[str] = _DEFAULT_NAMES,
) -> np.ndarray:
    """Check shapes, the ground truth and finiteness; return ``text_to_image`` as int64 [N_text].

    ``image_emb`` [N_img, D], ``text_emb`` [N_text, D], ``text_to_image`` [N_text] with values in
    ``[0, N_img)`` and every image owning at least one caption. ``names`` are used in the messages
    (the CLI passes the file names).
    """
    n_img, n_txt, n_map = names
    si, st = _shape(image_emb), _shape(text_emb)
    for name, s, what in ((n_img, si, "N_images"), (n_txt, st, "N_texts")):
        if len(s) != 2:
            raise ValueError(f"{name} must be 2-D [{what}, D], got shape {s}")
        if s[0] == 0:
            raise ValueError(f"{name} is empty (shape {s})")
    if si[1] != st[1]:
        raise ValueError(f"{n_img} has dim {si[1]} but {n_txt} has dim {st[1]}")
    g = validate_ground_truth(text_to_image, si[0], st[0], names=names)
    check_finite(image_emb, n_img)
    check_finite(text_emb, n_txt)
    return g


def caption_index(text_to_image: np.ndarray, n_images: int) -> np.ndarray:
    """Padded caption rows per image: [N_img, max_captions] int64, ``-1`` where an image has fewer."""
    g = np.asarray(text_to_image, dtype=np.int64)
    counts = np.bincount(g, minlength=n_images)
    order = np.argsort(g, kind="stable")
    starts = np.cumsum(counts) - counts
    slot = np.arange(len(g)) - np.repeat(starts, counts)
    caps = np.full((n_images, int(counts.max(initial=0))), -1, dtype=np.int64)
    caps[g[order], slot] = order
    return caps


def _resolve_device(device: str | torch.device | None, *xs: ArrayLike) -> torch.device:
    if device is not None:
        return torch.device(device)
    for x in xs:
        if isinstance(x, torch.Tensor):
            return x.device
    return torch.device("cpu")


def _to_float_tensor(x: ArrayLike, device: torch.device, normalize: bool) -> torch.Tensor:
    """Float32 contiguous [N, D] on ``device``, L2-normalised rows if asked (zero rows stay zero)."""
    if isinstance(x, torch.Tensor):
        t = x.detach().to(device=device, dtype=torch.float32)
        if normalize and t.data_ptr() == x.data_ptr():
            t = t.clone()  # never normalise the caller's tensor in place
        t = t.contiguous()
    else:
        t = torch.from_numpy(np.array(x, dtype=np.float32, order="C")).to(device)
    if normalize:
        t.div_(torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min_(1e-12))
    return t


class _RowSource:
    """Rows of an [N, D] array (numpy, memmap or tensor) as float32 tensors on ``device``, optionally
    L2-normalised, without holding a full copy: each row's norm is computed once, so a row comes
    out bit-identical whichever block it is fetched in. CPU work is done in numpy: torch's threaded
    elementwise ops pay a thread wake-up per call, which is slow on a busy machine."""

    def __init__(self, x: ArrayLike, device: torch.device, normalize: bool, block: int = 65536) -> None:
        if isinstance(x, torch.Tensor) and x.device.type == "cpu" and device.type == "cpu":
            x = x.detach()
            x = x.float().numpy() if x.dtype == torch.bfloat16 else x.numpy()  # a view unless bf16
        self.x, self.device, self.n = x, device, _shape(x)[0]
        self.on_cpu = device.type == "cpu" and not isinstance(x, torch.Tensor)
        self.norms = None
        if normalize:
            norms = [self._raw(slice(s, s + block)) for s in range(0, self.n, block)]
            if self.on_cpu:
                self.norms = np.concatenate([np.sqrt(np.einsum("nd,nd->n", r, r)) for r in norms])
                np.maximum(self.norms, np.float32(1e-12), out=self.norms)
            else:
                self.norms = torch.cat([torch.linalg.vector_norm(r, dim=1) for r in norms]).clamp_min_(1e-12)

    def _raw(self, key):
        if self.on_cpu:
            return np.array(self.x[key], dtype=np.float32, order="C")  # a private copy
        if isinstance(self.x, torch.Tensor):
            idx = key if isinstance(key, slice) else torch.from_numpy(key).to(self.x.device)
            return self.x[idx].to(device=self.device, dtype=torch.float32)
        return torch.from_numpy(np.array(self.x[key], dtype=np.float32, order="C")).to(self.device)

    def get(self, key: slice | np.ndarray) -> torch.Tensor:
        """Rows ``x[key]`` (a slice or an index array) [n, D]; never a view the caller could see modified."""
        rows = self._raw(key)
        if self.on_cpu:
            if self.norms is not None:
                rows /= self.norms[key, None]
            return torch.from_numpy(rows)
        if self.norms is None:
            return rows.contiguous()
        norms = self.norms[key] if isinstance(key, slice) else self.norms[torch.from_numpy(key).to(self.device)]
        return (rows / norms[:, None]).contiguous()


def _balanced_chunks(n: int, size: int) -> list[tuple[int, int]]:
    """``[start, end)`` chunks of at most ``size`` with near-equal lengths (no tiny tail block)."""
    n_chunks = max(1, math.ceil(n / max(1, size)))
    edges = np.linspace(0, n, n_chunks + 1).round().astype(int)
    return [(int(a), int(b)) for a, b in zip(edges[:-1], edges[1:]) if b > a]


def rows_for_budget(n_columns: int, memory_budget: int = DEFAULT_MEMORY_BUDGET) -> int:
    """Rows of a [rows, n_columns] block of float32 scores plus its bool mask within ``memory_budget`` bytes."""
    return max(1, int(memory_budget) // (5 * max(1, n_columns)))


# --------------------------------------------------------------------------------------------
# exact ranks
# --------------------------------------------------------------------------------------------

@dataclass
class RetrievalRanks:
    """Exact 1-based ranks of every query.

    ``image_to_text`` [N_img]: rank of each image's best-ranked caption; ``text_to_image``
    [N_text]: rank of each caption's image; ``image_to_text_ap`` [N_img]: average precision over
    the image's captions (``None`` unless asked for; text → image AP is ``1 / rank``);
    ``n_repaired``: images whose threshold was recomputed column-wise (see the module doc).
    """

    image_to_text: np.ndarray
    text_to_image: np.ndarray
    image_to_text_ap: np.ndarray | None = None
    n_repaired: int = 0


def _true_pair_scores(T: _RowSource, I: torch.Tensor, g: np.ndarray) -> np.ndarray:
    """Score of every (caption, its image) pair [N_text], from GEMMs of the captions of a group of
    consecutive images against those images.

    GEMMs (rather than row-wise dot products) so that on common BLAS builds the values equal bit
    for bit what the big block GEMM gives for the same pair; the caller checks that. A group has
    at most ``_PAIR_ROWS`` captions and ``_PAIR_COLS`` images, so this costs about
    ``_PAIR_COLS / N_img`` of the main pass.
    """
    n_img = I.shape[0]
    order = np.argsort(g, kind="stable")
    starts = np.concatenate([[0], np.cumsum(np.bincount(g, minlength=n_img))])
    out = np.empty(len(g), dtype=np.float32)
    i0 = 0
    while i0 < n_img:
        fit = int(np.searchsorted(starts, starts[i0] + _PAIR_ROWS, side="right")) - 1
        i1 = min(n_img, i0 + _PAIR_COLS, max(i0 + 1, fit))
        lo, hi = i0, i1
        if hi - lo < _PAIR_MIN_COLS:  # keep the BLAS on its GEMM path
            hi = min(n_img, lo + _PAIR_MIN_COLS)
            lo = max(0, hi - _PAIR_MIN_COLS)
        gallery = I[lo:hi].T
        group = order[starts[i0] : starts[i1]]
        for r in range(0, len(group), _PAIR_ROWS):  # one image may own more than _PAIR_ROWS captions
            rows = group[r : r + _PAIR_ROWS]
            block = torch.mm(T.get(rows), gallery)
            cols = torch.from_numpy(g[rows] - lo).to(I.device)
            out[rows] = block.gather(1, cols[:, None])[:, 0].cpu().numpy()
        i0 = i1
    return out


def _caption_thresholds(pair_scores: np.ndarray, caps: np.ndarray, m: int) -> np.ndarray:
    """The ``m`` best caption scores of each image, descending: [m, N_img] float32, ``+inf`` padding."""
    vals = np.where(caps >= 0, pair_scores[np.maximum(caps, 0)], -np.inf).astype(np.float32)
    vals = -np.sort(-vals, axis=1)[:, :m]
    vals[~np.isfinite(vals)] = np.inf  # no gallery item is strictly above +inf: padding never counts
    return np.ascontiguousarray(vals.T)


def _average_precision(thr: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """AP per image from its caption scores ``thr`` [m, N] (descending, +inf padded) and
    ``counts`` [m, N] of gallery items strictly above each. A caption's precision is
    ``(1 + own captions strictly above) / rank``."""
    real = np.isfinite(thr)
    above_own = (np.where(real[None], thr[None], -np.inf) > thr[:, None]).sum(1)  # [m, N]
    prec = np.where(real, (1 + above_own) / (1.0 + counts), 0.0)
    return prec.sum(0) / real.sum(0)


class _BlockScorer:
    """Scores one block of caption rows against all images and counts, for both directions, the
    entries strictly above each query's true score. On CPU the counting runs in numpy (its SIMD
    compare and count are several times faster than torch's), split over ``pool``'s threads, in
    row groups that stay in cache."""

    SUB_ROWS = 32

    def __init__(self, rows: int, cols: int, thr: np.ndarray, device: torch.device,
                 pool: ThreadPoolExecutor | None = None, n_parts: int = 1) -> None:
        self.cpu = device.type == "cpu"
        self.scores = torch.empty(rows, cols, device=device)
        self.pool = pool if self.cpu else None
        n_parts = n_parts if self.pool is not None else 1
        if self.cpu:
            self.thr = thr
            self.masks = [np.empty((min(rows, self.SUB_ROWS), cols), dtype=bool) for _ in range(n_parts)]
        else:
            self.thr = torch.from_numpy(thr).to(device)
            self.mask = torch.empty(rows, cols, dtype=torch.bool, device=device)

    def __call__(self, T_rows: torch.Tensor, I: torch.Tensor, true_cols: np.ndarray,
                 i2t_counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Adds to ``i2t_counts`` [m, N_img]; returns the true-pair scores and text → image counts [n]."""
        n = T_rows.shape[0]
        S = torch.mm(T_rows, I.T, out=self.scores[:n])
        if not self.cpu:
            cols = torch.from_numpy(true_cols).to(S.device)
            true = S.gather(1, cols[:, None])
            mask = self.mask[:n]
            t2i = torch.gt(S, true, out=mask).sum(1)
            for k in range(len(self.thr)):
                i2t_counts[k] += torch.gt(S, self.thr[k], out=mask).sum(0).cpu().numpy()
            return true[:, 0].cpu().numpy(), t2i.cpu().numpy()
        S = S.numpy()
        true = S[np.arange(n), true_cols]
        t2i = np.empty(n, dtype=np.int64)
        parts = _balanced_chunks(n, math.ceil(n / len(self.masks)))
        sums = [np.zeros(i2t_counts.shape, dtype=np.int32) for _ in parts]  # < 2**31: rows per block
        jobs = [(S, true, t2i, a, b, mask, acc) for (a, b), mask, acc in zip(parts, self.masks, sums)]
        if len(jobs) == 1:
            self._count(*jobs[0])
        else:
            for f in [self.pool.submit(self._count, *job) for job in jobs]:
                f.result()
        for acc in sums:
            i2t_counts += acc
        return true, t2i

    def _count(self, S: np.ndarray, true: np.ndarray, t2i: np.ndarray, start: int, stop: int,
               mask_buf: np.ndarray, acc: np.ndarray) -> None:
        # SUB_ROWS <= 255: a group's column counts fit uint8, whose reduction needs no casting; a
        # whole-array count_nonzero per row is several times faster than count_nonzero(axis=1)
        for s in range(start, stop, self.SUB_ROWS):
            e = min(stop, s + self.SUB_ROWS)
            sub, mask = S[s:e], mask_buf[: e - s]
            np.greater(sub, true[s:e, None], out=mask)
            t2i[s:e] = [np.count_nonzero(row) for row in mask]
            for k in range(len(self.thr)):
                np.greater(sub, self.thr[k], out=mask)
                acc[k] += np.add.reduce(mask.view(np.uint8), axis=0, dtype=np.uint8)


def _repair_columns(T: _RowSource, I: torch.Tensor, caps: np.ndarray, images: np.ndarray, m: int,
                    rows: list[tuple[int, int]], memory_budget: int) -> tuple[np.ndarray, np.ndarray]:
    """Thresholds [m, n] and counts [m, n] of ``images``: their full score columns are assembled
    from block GEMMs and each threshold is read from the column it is compared with."""
    n_txt = T.n
    thr = np.empty((m, len(images)), dtype=np.float32)
    counts = np.empty((m, len(images)), dtype=np.int64)
    for s, e in _balanced_chunks(len(images), rows_for_budget(n_txt, memory_budget)):
        cols = I.index_select(0, torch.from_numpy(images[s:e]).to(I.device))
        S = np.empty((n_txt, e - s), dtype=np.float32)
        for r0, r1 in rows:
            S[r0:r1] = torch.mm(T.get(slice(r0, r1)), cols.T).cpu().numpy()
        c = caps[images[s:e]]  # [n, max_caps]
        pair = np.zeros(n_txt, dtype=np.float32)
        img, slot = np.nonzero(c >= 0)
        pair[c[img, slot]] = S[c[img, slot], img]
        thr[:, s:e] = _caption_thresholds(pair, c, m)
        for k in range(m):
            counts[k, s:e] = np.count_nonzero(S > thr[k, s:e], axis=0)
    return thr, counts


@torch.no_grad()
def retrieval_ranks(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    *,
    normalize: bool = True,
    with_map: bool = False,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device | None = None,
    input_names: Sequence[str] = _DEFAULT_NAMES,
    progress: bool | None = None,
) -> RetrievalRanks:
    """Exact ranks in both directions from ``image_emb`` [N_img, D], ``text_emb`` [N_text, D] and
    ``text_to_image`` [N_text] (image row of each caption row).

    Inputs may be numpy arrays (memory-mapped too) or tensors; ``device`` defaults to that of a
    tensor input, else CPU. Memory: a float32 copy of the images plus one block; captions are read
    (and normalised) block by block, so ``text_emb`` may be a memmap larger than RAM. Blocks hold
    ``chunk_size`` caption rows (default: as many as fit ``memory_budget`` bytes of float32 scores
    plus their mask). ``with_map`` adds one compare per caption slot (max captions per image) for
    the image → text average precision.
    """
    if chunk_size is not None and chunk_size < 1:
        raise ValueError(f"chunk_size must be positive, got {chunk_size}")
    g = validate_retrieval_inputs(image_emb, text_emb, text_to_image, names=input_names)
    dev = _resolve_device(device, image_emb, text_emb)
    I = _to_float_tensor(image_emb, dev, normalize)  # the gallery of every block: held whole
    T = _RowSource(text_emb, dev, normalize)  # captions: streamed block by block
    n_img, n_txt = I.shape[0], T.n
    caps = caption_index(g, n_img)
    m = caps.shape[1] if with_map else 1

    thr = _caption_thresholds(_true_pair_scores(T, I, g), caps, m)  # [m, N_img]
    rows = int(chunk_size) if chunk_size else rows_for_budget(n_img, memory_budget)
    chunks = _balanced_chunks(n_txt, min(rows, n_txt))
    t2i = np.empty(n_txt, dtype=np.int64)
    pair_in_block = np.empty(n_txt, dtype=np.float32)
    i2t_counts = np.zeros((m, n_img), dtype=np.int64)
    log.debug("retrieval: %d images x %d captions, %d blocks of <= %d rows", n_img, n_txt, len(chunks), rows)
    n_threads = torch.get_num_threads() if dev.type == "cpu" else 1
    with ThreadPoolExecutor(n_threads) if n_threads > 1 else contextlib.nullcontext() as pool:
        scorer = _BlockScorer(max(e - s for s, e in chunks), n_img, thr, dev, pool, n_threads)
        for s, e in tqdm(chunks, desc="retrieval", unit="block", leave=False,
                         disable=None if progress is None else not progress):
            pair_in_block[s:e], t2i[s:e] = scorer(T.get(slice(s, e)), I, g[s:e], i2t_counts)

    # the thresholds must equal, bit for bit, the scores the block GEMM gave the same pairs
    seen = _caption_thresholds(pair_in_block, caps, m)
    bad = np.flatnonzero((seen != thr).any(0))
    if len(bad):
        (log.info if len(bad) > 0.01 * n_img else log.debug)(
            "retrieval: %d of %d image thresholds differ from the block GEMM in the last bit; "
            "recomputing those columns", len(bad), n_img)
        thr[:, bad], i2t_counts[:, bad] = _repair_columns(T, I, caps, bad, m, chunks, memory_budget)

    ap = _average_precision(thr, i2t_counts) if with_map else None
    return RetrievalRanks(image_to_text=1 + i2t_counts[0], text_to_image=1 + t2i,
                          image_to_text_ap=ap, n_repaired=len(bad))


# --------------------------------------------------------------------------------------------
# metrics
# --------------------------------------------------------------------------------------------

def _stats(ranks: np.ndarray, ap: np.ndarray | None, ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Metrics of ranks [..., n] along the last axis (vectorised over bootstrap replicates)."""
    out = {f"R@{k}": 100.0 * (ranks <= k).mean(-1) for k in ks}
    out["median_rank"] = np.floor(np.median(ranks, axis=-1))
    out["mean_rank"] = ranks.mean(-1)
    if ap is not None:
        out["mAP"] = 100.0 * ap.mean(-1)
    return out


def _check_bootstrap(bootstrap: int, ci: float) -> None:
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def _check_ks(ks: Sequence[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or any(k < 1 for k in ks):
        raise ValueError(f"ks must be positive integers, got {ks}")
    return ks


def metrics_from_ranks(
    ranks: RetrievalRanks,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Summarise :class:`RetrievalRanks` as ``{"image_to_text": {...}, "text_to_image": {...}, "rsum"}``.

    Per direction: ``R@k`` (percent), ``median_rank``, ``mean_rank``, ``mAP`` (percent, when AP
    was computed), ``n_queries``; with ``bootstrap=n`` also ``<metric>_ci_low``/``_ci_high``
    (percentile bootstrap over queries, each direction resampled independently, seeded).
    """
    ks = _check_ks(ks)
    _check_bootstrap(bootstrap, ci)
    with_map = ranks.image_to_text_ap is not None
    per_dir = {
        "image_to_text": (ranks.image_to_text, ranks.image_to_text_ap),
        "text_to_image": (ranks.text_to_image, 1.0 / ranks.text_to_image if with_map else None),
    }
    out: dict[str, Any] = {}
    for name, (r, ap) in per_dir.items():
        out[name] = {key: float(v) for key, v in _stats(r, ap, ks).items()}
        out[name]["n_queries"] = int(len(r))
    out["rsum"] = float(sum(out[d][f"R@{k}"] for d in DIRECTIONS for k in ks))

    if bootstrap:
        rng = np.random.default_rng(seed)
        lo_q, hi_q = 50.0 * (1 - ci), 50.0 * (1 + ci)
        reps: dict[str, dict[str, np.ndarray]] = {}
        for name, (r, ap) in per_dir.items():
            n = len(r)
            batch = max(1, 4_000_000 // n)
            parts = []
            for b0 in range(0, bootstrap, batch):
                idx = rng.integers(0, n, size=(min(batch, bootstrap - b0), n))
                parts.append(_stats(r[idx], None if ap is None else ap[idx], ks))
            reps[name] = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
            for key, v in reps[name].items():
                out[name][f"{key}_ci_low"] = float(np.percentile(v, lo_q))
                out[name][f"{key}_ci_high"] = float(np.percentile(v, hi_q))
        rsum = sum(reps[d][f"R@{k}"] for d in DIRECTIONS for k in ks)
        out["rsum_ci_low"] = float(np.percentile(rsum, lo_q))
        out["rsum_ci_high"] = float(np.percentile(rsum, hi_q))
        out["bootstrap"] = int(bootstrap)
        out["ci"] = float(ci)
    return out


def retrieval_metrics(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    normalize: bool = True,
    with_map: bool = False,
    bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
    chunk_size: int | None = None,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
    device: str | torch.device | None = None,
    input_names: Sequence[str] = _DEFAULT_NAMES,
    progress: bool | None = None,
) -> dict[str, Any]:
    """Exact retrieval metrics of ``image_emb`` [N_img, D] vs ``text_emb`` [N_text, D].

    ``text_to_image`` [N_text] gives each caption's image row. Returns
    ``{"image_to_text": {"R@1", ..., "median_rank", "mean_rank", ["mAP"], "n_queries"},
    "text_to_image": {...}, "rsum": float}``; see :func:`retrieval_ranks` and
    :func:`metrics_from_ranks` for the options.
    """
    ks = _check_ks(ks)
    _check_bootstrap(bootstrap, ci)
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, normalize=normalize, with_map=with_map,
                            chunk_size=chunk_size, memory_budget=memory_budget, device=device,
                            input_names=input_names, progress=progress)
    return metrics_from_ranks(ranks, ks, bootstrap=bootstrap, ci=ci, seed=seed)


def flatten_metrics(metrics: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"image_to_text": {"R@1": x}, "rsum": y}`` → ``{"i2t/R@1": x, "rsum": y}`` (numbers only)."""
    flat: dict[str, float] = {}
    for key, value in metrics.items():
        name = prefix + SHORT_NAMES.get(key, key)
        if isinstance(value, Mapping):
            flat.update(flatten_metrics(value, prefix=name + "/"))
        elif isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool):
            flat[name] = float(value)
    return flat


class RetrievalEvaluator:
    """``evaluator(model) -> {"i2t/R@1": ..., "t2i/R@1": ..., "rsum": ...}`` for the Trainer's validation.

    Encodes ``image_inputs`` and ``text_inputs`` (anything ``model.encode`` takes, sliced in
    batches of ``batch_size``) with :func:`align.base.encode_in_batches` and scores them with
    :func:`retrieval_metrics`. ``text_to_image`` [N_text] gives each text's image row;
    ``modalities`` names the (gallery-of-images, captions) pair passed to ``encode``.
    """

    def __init__(
        self,
        image_inputs: Any,
        text_inputs: Any,
        text_to_image: ArrayLike,
        ks: Sequence[int] = DEFAULT_KS,
        batch_size: int = 1024,
        *,
        modalities: tuple[str, str] = ("image", "text"),
        normalize: bool = True,
        with_map: bool = False,
        chunk_size: int | None = None,
        prefix: str = "",
    ) -> None:
        self.image_inputs = image_inputs
        self.text_inputs = text_inputs
        self.text_to_image = validate_ground_truth(text_to_image, len(image_inputs), len(text_inputs),
                                                   names=("image_inputs", "text_inputs", "text_to_image"))
        self.ks = _check_ks(ks)
        self.batch_size = batch_size
        self.modalities = modalities
        self.normalize = normalize
        self.with_map = with_map
        self.chunk_size = chunk_size
        self.prefix = prefix

    def __call__(self, model: Any) -> dict[str, float]:
        # imported here: `align` pulls in open_clip and torch_geometric, which the CLI does not need
        from align.base import encode_in_batches

        img = encode_in_batches(model, self.modalities[0], self.image_inputs, self.batch_size)
        txt = encode_in_batches(model, self.modalities[1], self.text_inputs, self.batch_size)
        metrics = retrieval_metrics(img, txt, self.text_to_image, self.ks, normalize=self.normalize,
                                    with_map=self.with_map, chunk_size=self.chunk_size, progress=False,
                                    input_names=(f"{self.modalities[0]} embeddings",
                                                 f"{self.modalities[1]} embeddings", "text_to_image"))
        return flatten_metrics(metrics, prefix=self.prefix)


# --------------------------------------------------------------------------------------------
# compositional hard negatives
# --------------------------------------------------------------------------------------------

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


# --------------------------------------------------------------------------------------------
# faiss top-k search
# --------------------------------------------------------------------------------------------

class FaissRetriever:
    """Top-k inner-product search with faiss, for galleries too big for exact ranking.

    ``kind``: ``"flat"`` (``IndexFlatIP``, exact), ``"ivf"`` (``IndexIVFFlat``; ``nlist`` lists,
    default ``4·sqrt(N)`` of the first batch added, which also trains it; ``nprobe`` searched) or
    ``"hnsw"`` (``IndexHNSWFlat`` with ``hnsw_m`` links, ``ef_construction``, ``ef_search``).
    Vectors are L2-normalised (cosine) unless ``normalize=False``. ``add`` may be called
    repeatedly (e.g. on slices of a memory-mapped array); it copies ``add_batch`` rows at a time.
    """

    KINDS = ("flat", "ivf", "hnsw")

    def __init__(
        self,
        kind: str = "flat",
        *,
        normalize: bool = True,
        nlist: int | None = None,
        nprobe: int = 16,
        hnsw_m: int = 32,
        ef_construction: int = 200,
        ef_search: int = 128,
        add_batch: int = 65536,
        seed: int = 0,
    ) -> None:
        if kind not in self.KINDS:
            raise ValueError(f"unknown faiss index kind {kind!r}; known: {', '.join(self.KINDS)}")
        self.kind = kind
        self.normalize = normalize
        self.nlist = nlist
        self.nprobe = nprobe
        self.hnsw_m = hnsw_m
        self.ef_construction = ef_construction
        self.ef_search = ef_search
        self.add_batch = add_batch
        self.seed = seed
        self.index_ = None

    @property
    def ntotal(self) -> int:
        return 0 if self.index_ is None else int(self.index_.ntotal)

    def _prep(self, x: ArrayLike, name: str) -> np.ndarray:
        x = x.detach().cpu().numpy() if isinstance(x, torch.Tensor) else x
        x = np.array(x, dtype=np.float32, order="C")  # a private copy faiss may normalise in place
        if x.ndim != 2:
            raise ValueError(f"{name} must be 2-D [N, D], got shape {x.shape}")
        if self.index_ is not None and x.shape[1] != self.index_.d:
            raise ValueError(f"{name} has dim {x.shape[1]} but the index holds dim {self.index_.d}")
        check_finite(x, name)
        if self.normalize:
            import faiss

            faiss.normalize_L2(x)
        return x

    def _build(self, first: np.ndarray) -> None:
        import faiss

        d = first.shape[1]
        if self.kind == "flat":
            self.index_ = faiss.IndexFlatIP(d)
        elif self.kind == "hnsw":
            self.index_ = faiss.IndexHNSWFlat(d, self.hnsw_m, faiss.METRIC_INNER_PRODUCT)
            self.index_.hnsw.efConstruction = self.ef_construction
        else:
            nlist = self.nlist or max(1, int(round(4 * math.sqrt(len(first)))))
            nlist = min(nlist, len(first))
            quantizer = faiss.IndexFlatIP(d)
            self.index_ = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
            self.index_.cp.seed = self.seed
            log.debug("faiss ivf: training %d lists on %d vectors", nlist, len(first))
            self.index_.train(first)
            self._quantizer = quantizer  # keep the Python object alive as long as the index

    def add(self, gallery: ArrayLike) -> "FaissRetriever":
        """Add gallery vectors [N, D] (numpy, memmap or tensor); the first call builds the index (and
        trains it, for IVF)."""
        n = _shape(gallery)[0]
        for s in range(0, n, self.add_batch):
            x = self._prep(gallery[s : s + self.add_batch], "gallery")
            if self.index_ is None:
                self._build(x)
            self.index_.add(x)
        return self

    def search(self, queries: ArrayLike, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of each query [Nq, D]: (scores [Nq, k] float32, gallery indices [Nq, k] int64, best first)."""
        if self.index_ is None or self.ntotal == 0:
            raise ValueError("FaissRetriever.search called before add()")
        if k < 1:
            raise ValueError(f"k must be positive, got {k}")
        q = self._prep(queries, "queries")
        if self.kind == "ivf":
            self.index_.nprobe = self.nprobe
        elif self.kind == "hnsw":
            self.index_.hnsw.efSearch = max(self.ef_search, k)
        scores, idx = self.index_.search(q, k)
        return scores, idx.astype(np.int64, copy=False)


@torch.no_grad()
def exact_topk(
    queries: ArrayLike,
    gallery: ArrayLike,
    k: int,
    *,
    normalize: bool = True,
    memory_budget: int = DEFAULT_MEMORY_BUDGET,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-``k`` by inner product (cosine if ``normalize``): (scores, indices) [Nq, k], in query blocks."""
    dev = _resolve_device(None, queries, gallery)
    Q = _RowSource(queries, dev, normalize)
    G = _to_float_tensor(gallery, dev, normalize)
    k = min(k, G.shape[0])
    scores = np.empty((Q.n, k), dtype=np.float32)
    idx = np.empty((Q.n, k), dtype=np.int64)
    for s, e in _balanced_chunks(Q.n, rows_for_budget(G.shape[0], memory_budget)):
        v, i = torch.topk(torch.mm(Q.get(slice(s, e)), G.T), k, dim=1)
        scores[s:e], idx[s:e] = v.cpu().numpy(), i.cpu().numpy()
    return scores, idx


def recall_at_k_from_topk(
    topk_indices: np.ndarray,
    targets: np.ndarray,
    ks: Sequence[int] = DEFAULT_KS,
) -> dict[str, float]:
    """R@K in percent from top-k lists [Nq, k_max] (best first).

    ``targets`` is [Nq] (one true gallery item per query) or [Nq, m] padded with ``-1`` (a hit
    if any of the query's true items is within the first K, e.g. :func:`caption_index` rows for
    image → text). Every K must be at most the width of ``topk_indices``.
    """
    ks = _check_ks(ks)
    topk = np.asarray(topk_indices)
    tg = np.asarray(targets)
    if topk.ndim != 2:
        raise ValueError(f"topk_indices must be 2-D [N_queries, k], got shape {topk.shape}")
    if tg.ndim == 1:
        tg = tg[:, None]
    if tg.ndim != 2 or len(tg) != len(topk):
        raise ValueError(f"targets must be [N_queries={len(topk)}] or [N_queries, m], got shape {np.shape(targets)}")
    if max(ks) > topk.shape[1]:
        raise ValueError(f"R@{max(ks)} needs top-{max(ks)} lists, got top-{topk.shape[1]}")
    hit = np.zeros(topk.shape, dtype=bool)  # hit[q, r]: the r-th result is a true item of q
    for c in range(tg.shape[1]):
        hit |= (topk == tg[:, c : c + 1]) & (tg[:, c : c + 1] >= 0)
    first = np.where(hit.any(1), hit.argmax(1) + 1, np.iinfo(np.int64).max)
    return {f"R@{k}": 100.0 * float((first <= k).mean()) for k in ks}


def faiss_vs_exact_recall(approx_indices: np.ndarray, exact_indices: np.ndarray) -> float:
    """Percent of the exact top-k items that the approximate top-k also returned, averaged over
    queries (the usual ANN "recall@k"); both [Nq, k]."""
    a, e = np.asarray(approx_indices), np.asarray(exact_indices)
    if a.shape != e.shape or a.ndim != 2:
        raise ValueError(f"approx_indices {a.shape} and exact_indices {e.shape} must both be [N_queries, k]")
    found = 0
    for c in range(e.shape[1]):  # k is small: one vectorised membership test per exact column
        found += int((a == e[:, c : c + 1]).any(1).sum())
    return 100.0 * found / e.size


def faiss_retrieval_metrics(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    kind: str = "flat",
    normalize: bool = True,
    compare_exact: bool = False,
    **faiss_options: Any,
) -> dict[str, Any]:
    """R@K of both directions from faiss top-max(K) search (same layout as :func:`retrieval_metrics`,
    recalls and ``rsum`` only). ``compare_exact`` adds ``faiss_vs_exact`` [percent per direction]
    from an exact top-k pass."""
    ks = _check_ks(ks)
    g = validate_retrieval_inputs(image_emb, text_emb, text_to_image)
    k = max(ks)
    caps = caption_index(g, _shape(image_emb)[0])
    out: dict[str, Any] = {}
    found: dict[str, np.ndarray] = {}
    for name, queries, gallery, targets in (("image_to_text", image_emb, text_emb, caps),
                                            ("text_to_image", text_emb, image_emb, g)):
        retriever = FaissRetriever(kind, normalize=normalize, **faiss_options).add(gallery)
        _, found[name] = retriever.search(queries, k)
        out[name] = recall_at_k_from_topk(found[name], targets, ks)
    out["rsum"] = float(sum(out[d][f"R@{kk}"] for d in DIRECTIONS for kk in ks))
    if compare_exact:
        out["faiss_vs_exact"] = {
            name: faiss_vs_exact_recall(found[name], exact_topk(q, gal, k, normalize=normalize)[1])
            for name, q, gal in (("image_to_text", image_emb, text_emb), ("text_to_image", text_emb, image_emb))
        }
    return out


__all__ = [
    "DEFAULT_KS", "DEFAULT_MEMORY_BUDGET", "RetrievalRanks", "retrieval_ranks", "retrieval_metrics",
    "metrics_from_ranks", "flatten_metrics", "RetrievalEvaluator", "validate_retrieval_inputs",
    "validate_ground_truth", "check_finite",
    "caption_index", "rows_for_budget", "hard_negative_metrics", "hard_negative_accuracy", "FaissRetriever",
    "exact_topk", "recall_at_k_from_topk", "faiss_vs_exact_recall", "faiss_retrieval_metrics",
]
