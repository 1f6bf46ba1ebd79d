"""Cross-modal retrieval evaluation: exact ranks in both directions, honest ties, faiss top-k, hard negatives.

Ground truth is many-to-many as in the VSE++ evaluation and CLIP_benchmark: ``text_to_image[j]``
is the image row of caption row ``j`` and an image may have several captions.

* **image → text**: the image's rank is that of its best-ranked caption;
* **text → image**: the caption's rank is that of its one image;
* ranks are those of float64 scoring (cosine of rows normalised in float64 unless
  ``normalize=False``); **ties** are scored as ``ties`` says: ``"expected"`` (default: the
  expected rank and hit rate under a uniformly random tie-break, so a collapsed model scores
  exactly chance), ``"pessimistic"`` or ``"optimistic"`` (the old, gameable convention). VSE++
  and CLIP_benchmark break ties by sort order, so their results depend on the caption order
  (:mod:`experiments.retrieval.ties`). The output reports each direction's ``tied_fraction`` and
  a warning is logged above 1 %. Zero-norm rows raise (``degenerate="tie"`` scores them as ties).

:func:`retrieval_metrics` returns R@K in percent, median rank (``floor`` of the median, as VSE++
and ``open_clip_train`` report it) and mean rank (1-based), ``rsum`` (the sum of the recalls of
both directions), optionally mAP (image → text: average precision over all of the image's
captions; text → image: ``E[1 / rank]``) and percentile-bootstrap confidence intervals.

How the ranks are computed (:mod:`experiments.retrieval.ranks`): one GEMM pass in blocks of
caption rows in bf16 (where it is faster: CUDA, AMX/AVX-512 bf16 CPUs) or float32, each block
used for both directions; every comparison whose low-precision score lies within a proven error
bound (:mod:`experiments.retrieval.precision`) of the query's exact float64 threshold is
re-scored in float64, so the ranks equal float64 scoring, ties included.

For galleries that do not fit in memory, :class:`FaissRetriever` serves top-k search
(``flat``/``ivf``/``hnsw``), :func:`recall_at_k_from_topk` turns its top-k into R@K and
:func:`faiss_vs_exact_recall` reports how much of the exact top-k it found.
"""
from __future__ import annotations

from .hard_negatives import hard_negative_accuracy, hard_negative_metrics
from .inputs import (
    DEFAULT_KS,
    DEFAULT_MEMORY_BUDGET,
    DEGENERATE_MODES,
    DIRECTIONS,
    SHORT_NAMES,
    TIE_MODES,
    ArrayLike,
    balanced_chunks,
    caption_index,
    check_finite,
    rows_for_budget,
    validate_ground_truth,
    validate_retrieval_inputs,
)
from .metrics import TIE_WARNING_FRACTION, RetrievalEvaluator, flatten_metrics, metrics_from_ranks, retrieval_metrics
from .precision import PRECISIONS, choose_precision, cpu_bf16_is_faster
from .ranks import RetrievalRanks, ranks_from_scores, retrieval_ranks
from .search import (
    FaissRetriever,
    exact_topk,
    faiss_retrieval_metrics,
    faiss_vs_exact_recall,
    recall_at_k_from_topk,
)
from .ties import TieCounts

_balanced_chunks = balanced_chunks  # the old private name, still used by callers of the single module

__all__ = [
    "DEFAULT_KS", "DEFAULT_MEMORY_BUDGET", "DIRECTIONS", "SHORT_NAMES", "TIE_MODES", "DEGENERATE_MODES",
    "PRECISIONS", "TIE_WARNING_FRACTION", "ArrayLike", "RetrievalRanks", "TieCounts", "retrieval_ranks", "ranks_from_scores",
    "retrieval_metrics", "metrics_from_ranks", "flatten_metrics", "RetrievalEvaluator",
    "validate_retrieval_inputs", "validate_ground_truth", "check_finite", "caption_index", "rows_for_budget",
    "balanced_chunks", "choose_precision", "cpu_bf16_is_faster", "hard_negative_metrics",
    "hard_negative_accuracy", "FaissRetriever", "exact_topk", "recall_at_k_from_topk",
    "faiss_vs_exact_recall", "faiss_retrieval_metrics",
]
