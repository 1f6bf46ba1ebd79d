"""Retrieval metrics from exact ranks: R@K, median/mean rank, mAP, rsum, tied share, bootstrap CIs."""
from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch

from .inputs import (
    _DEFAULT_NAMES,
    DEFAULT_KS,
    DEFAULT_MEMORY_BUDGET,
    DIRECTIONS,
    SHORT_NAMES,
    ArrayLike,
    check_ks,
    validate_ground_truth,
)
from .ranks import RetrievalRanks, retrieval_ranks

log = logging.getLogger(__name__)

#: a warning is logged when more than this share of a direction's queries has a tied true item
TIE_WARNING_FRACTION = 0.01


def _check_bootstrap(bootstrap: int, ci: float) -> None:
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not 0.0 < ci < 1.0:
        raise ValueError(f"ci must be in (0, 1), got {ci}")


def _per_query(ranks: RetrievalRanks, ks: Sequence[int], with_map: bool) -> dict[str, dict[str, np.ndarray]]:
    """Per direction, per query [n]: ``hit@k`` (hit probability), ``rank``, ``ap`` (if asked), ``tied``."""
    out = {}
    for name in DIRECTIONS:
        r = np.asarray(getattr(ranks, name), dtype=np.float64)
        counts = getattr(ranks, f"{name}_counts")
        q = {"rank": r}
        for k in ks:
            q[f"hit@{k}"] = counts.hit(k, ranks.ties) if counts is not None else (r <= k).astype(np.float64)
        if with_map:
            ap = getattr(ranks, f"{name}_ap")
            q["ap"] = np.asarray(ap, dtype=np.float64) if ap is not None else 1.0 / r
        if counts is not None:
            q["tied"] = counts.is_tied().astype(np.float64)
        out[name] = q
    return out


def _stats(q: Mapping[str, np.ndarray], ks: Sequence[int]) -> dict[str, np.ndarray]:
    """Metrics of per-query arrays [..., n] along the last axis (vectorised over bootstrap replicates)."""
    out = {f"R@{k}": 100.0 * q[f"hit@{k}"].mean(-1) for k in ks}
    out["median_rank"] = np.floor(np.median(q["rank"], axis=-1))
    out["mean_rank"] = q["rank"].mean(-1)
    if "ap" in q:
        out["mAP"] = 100.0 * q["ap"].mean(-1)
    return out


def metrics_from_ranks(
    ranks: RetrievalRanks,
    ks: Sequence[int] = DEFAULT_KS,
    *,
    bootstrap: int = 0,
    ci: float = 0.95,
    seed: int = 0,
) -> dict[str, Any]:
    """Summarise :class:`RetrievalRanks` as ``{"image_to_text": {...}, "text_to_image": {...}, "rsum"}``.

    Per direction: ``R@k`` (percent; the expected hit rate under ``ranks.ties``), ``median_rank``
    (``floor`` of the median of the per-query ranks, as VSE++ reports it; in ``"expected"`` mode of
    the per-query *expected* ranks), ``mean_rank`` (their mean, which is the expected mean rank),
    ``mAP`` (percent, when AP was computed), ``n_queries`` and ``tied_fraction`` (share of queries
    whose best true item has the same float64 score as a non-true item; when the ranks carry
    their tie counts). With ``bootstrap=n`` also ``<metric>_ci_low``/``_ci_high`` (percentile
    bootstrap over queries, each direction resampled independently, seeded).
    """
    ks = check_ks(ks)
    _check_bootstrap(bootstrap, ci)
    with_map = ranks.image_to_text_ap is not None
    per_dir = _per_query(ranks, ks, with_map)
    out: dict[str, Any] = {}
    for name, q in per_dir.items():
        out[name] = {key: float(v) for key, v in _stats(q, ks).items()}
        out[name]["n_queries"] = int(len(q["rank"]))
        if "tied" in q:
            frac = float(q["tied"].mean())
            out[name]["tied_fraction"] = frac
            if frac > TIE_WARNING_FRACTION:
                log.warning("retrieval %s: %.1f%% of the queries have their true item tied with another "
                            "item (scored %s); a collapsed or degenerate model?", name, 100 * frac, ranks.ties)
    out["rsum"] = float(sum(out[d][f"R@{k}"] for d in DIRECTIONS for k in ks))
    if ranks.image_to_text_counts is not None:  # ranks built elsewhere carry their own convention
        out["ties"] = ranks.ties

    if bootstrap:
        rng = np.random.default_rng(seed)
        lo_q, hi_q = 50.0 * (1 - ci), 50.0 * (1 + ci)
        reps: dict[str, dict[str, np.ndarray]] = {}
        for name, q in per_dir.items():
            n = len(q["rank"])
            batch = max(1, 4_000_000 // n)
            parts = []
            for b0 in range(0, bootstrap, batch):
                idx = rng.integers(0, n, size=(min(batch, bootstrap - b0), n))
                parts.append(_stats({key: v[idx] for key, v in q.items() if key != "tied"}, ks))
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
    ties: str = "expected",
    degenerate: str = "error",
    precision: str = "auto",
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
    ``{"image_to_text": {"R@1", ..., "median_rank", "mean_rank", ["mAP"], "n_queries",
    "tied_fraction"}, "text_to_image": {...}, "rsum": float, "ties": str}``. Ties are scored as
    ``ties`` says (default ``"expected"``: a uniformly random tie-break, so a model whose
    embeddings collapse scores chance; see :mod:`experiments.retrieval.ties` for the VSE++ /
    CLIP_benchmark convention); zero-norm rows raise unless ``degenerate="tie"``. See
    :func:`retrieval_ranks` and :func:`metrics_from_ranks` for the other options.
    """
    ks = check_ks(ks)
    _check_bootstrap(bootstrap, ci)
    ranks = retrieval_ranks(image_emb, text_emb, text_to_image, normalize=normalize, with_map=with_map,
                            ties=ties, degenerate=degenerate, precision=precision, chunk_size=chunk_size,
                            memory_budget=memory_budget, device=device, input_names=input_names,
                            progress=progress)
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
    ``modalities`` names the (gallery-of-images, captions) pair passed to ``encode``. Ties are
    scored ``ties`` (default ``"expected"``), so a model that collapses scores chance and is not
    kept as ``best.pt``; zero-norm embeddings are scored as ties (``degenerate="tie"``, the default
    here: a collapsing model must score chance, not stop the run) unless ``degenerate="error"``.
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
        ties: str = "expected",
        degenerate: str = "tie",
        precision: str = "auto",
        chunk_size: int | None = None,
        prefix: str = "",
    ) -> None:
        from .inputs import DEGENERATE_MODES, TIE_MODES, check_option

        self.image_inputs = image_inputs
        self.text_inputs = text_inputs
        self.text_to_image = validate_ground_truth(text_to_image, len(image_inputs), len(text_inputs),
                                                   names=("image_inputs", "text_inputs", "text_to_image"))
        self.ks = check_ks(ks)
        self.batch_size = batch_size
        self.modalities = modalities
        self.normalize = normalize
        self.with_map = with_map
        self.ties = check_option(ties, TIE_MODES, "ties")
        self.degenerate = check_option(degenerate, DEGENERATE_MODES, "degenerate")
        self.precision = precision
        self.chunk_size = chunk_size
        self.prefix = prefix

    def __call__(self, model: Any) -> dict[str, float]:
        # imported here: `align` pulls in open_clip and torch_geometric, which the CLI does not need
        from align.base import encode_in_batches

        img = encode_in_batches(model, self.modalities[0], self.image_inputs, self.batch_size)
        txt = encode_in_batches(model, self.modalities[1], self.text_inputs, self.batch_size)
        metrics = retrieval_metrics(img, txt, self.text_to_image, self.ks, normalize=self.normalize,
                                    with_map=self.with_map, ties=self.ties, degenerate=self.degenerate,
                                    precision=self.precision, chunk_size=self.chunk_size, progress=False,
                                    input_names=(f"{self.modalities[0]} embeddings",
                                                 f"{self.modalities[1]} embeddings", "text_to_image"))
        return flatten_metrics(metrics, prefix=self.prefix)
