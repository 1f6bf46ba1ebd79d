"""Top-k search: faiss indexes for galleries too big for exact ranking, exact top-k, R@K from top-k."""
from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from .inputs import (
    DEFAULT_KS,
    DEFAULT_MEMORY_BUDGET,
    DIRECTIONS,
    ArrayLike,
    _shape,
    balanced_chunks,
    caption_index,
    check_finite,
    check_ks,
    resolve_device,
    rows_for_budget,
    validate_retrieval_inputs,
)

log = logging.getLogger(__name__)


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


def _float_rows(x: ArrayLike, device: torch.device, normalize: bool) -> torch.Tensor:
    """Float32 [n, D] copy on ``device``, L2-normalised rows if asked (zero rows stay zero)."""
    t = x.detach().to(device=device, dtype=torch.float32, copy=True) if isinstance(x, torch.Tensor) \
        else torch.from_numpy(np.array(x, dtype=np.float32, order="C")).to(device)
    if normalize:
        t.div_(torch.linalg.vector_norm(t, dim=1, keepdim=True).clamp_min_(1e-30))
    return t.contiguous()


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
    dev = resolve_device(None, queries, gallery)
    G = _float_rows(gallery, dev, normalize)
    n_q = _shape(queries)[0]
    k = min(k, G.shape[0])
    scores = np.empty((n_q, k), dtype=np.float32)
    idx = np.empty((n_q, k), dtype=np.int64)
    for s, e in balanced_chunks(n_q, rows_for_budget(G.shape[0], memory_budget)):
        v, i = torch.topk(torch.mm(_float_rows(queries[s:e], dev, normalize), G.T), k, dim=1)
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
    ks = check_ks(ks)
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
    ks = check_ks(ks)
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

