"""DeViSE: a map from visual features into a frozen label-embedding space (Frome et al., NeurIPS 2013).

The paper maps CNN features ``v`` with a linear ``M`` into the space of (unit-norm) word2vec
label vectors ``t`` and trains ``M`` with the hinge rank loss

    loss(v, y) = sum_{j != y} max(0, margin - t_y . M v + t_j . M v).

Here the label vectors are frozen sentence embeddings of the label names (MiniLM in alignfuse,
computed outside this module and passed in as ``class_embeddings``); they are L2-normalised and
kept as a buffer, never trained. As in the paper, the loss scores the unnormalised ``M v``;
``encode``/retrieval use its normalised direction.

The loss is pytorch-metric-learning's ``TripletMarginLoss`` with a dot-product similarity and
the class embeddings as the reference set: for an anchor ``M v`` with positive ``t_y`` and
negative ``t_j`` it is exactly ``relu(t_j.Mv - t_y.Mv + margin)``. Which negatives enter:

* ``negatives="all"`` — every wrong label, summed, averaged over the batch: the paper's
  objective exactly. (The paper approximates the sum by sampling wrong labels and stopping at
  the first violator, a speed-up that is unnecessary for label sets of our size.)
* ``negatives="hardest"`` — only the most violating wrong label per image, mined with pml's
  ``BatchHardMiner`` (the max-of-hinges variant of VSE++, Faghri et al. 2018).

Targets (``targets``): ``"labels"`` (the paper) maps each image onto the embedding of its class name;
``"captions"`` onto the frozen embedding of its own caption, the other (distinct) captions of the batch being
the wrong labels of the same hinge rank loss. The second is DeViSE with sentence embeddings as the label set
(still a map into a frozen text space, unlike CLIP's two trained heads and InfoNCE): on captioned data the
class-name targets can only find a caption's category, the caption targets can find the caption.

Zero-shot evaluation (``flat_hit_at_k``, ``zero_shot_eval``) follows the paper's "flat hit@k":
the fraction of test images whose true label is among the k nearest label embeddings.
"""
from __future__ import annotations

import logging
from typing import Protocol, Sequence

import torch
import torch.nn.functional as F
from pytorch_metric_learning.distances import DotProductSimilarity
from pytorch_metric_learning.losses import TripletMarginLoss
from pytorch_metric_learning.miners import BatchHardMiner
from pytorch_metric_learning.reducers import SumReducer
from torch import Tensor, nn

from align.base import ALIGNERS, GradientAligner

log = logging.getLogger(__name__)


def _all_negative_triplets(labels: Tensor, num_classes: int) -> tuple[Tensor, Tensor, Tensor]:
    """(anchor, positive, negative) index triplets pairing each row with every wrong class, O(B*C)."""
    wrong = torch.ones(len(labels), num_classes, dtype=torch.bool, device=labels.device)
    wrong[torch.arange(len(labels), device=labels.device), labels] = False
    anchor, negative = wrong.nonzero(as_tuple=True)
    return anchor, labels[anchor], negative


class HingeRankLoss(nn.Module):
    """DeViSE hinge rank loss of mapped visual vectors ``[B, D]`` against label embeddings ``[C, D]``.

    ``mean_b sum_{j in negatives(b)} max(0, margin - t_{y_b}.v_b + t_j.v_b)`` with ``negatives``
    ``"all"`` (every wrong label; the paper's objective) or ``"hardest"`` (the most violating one).
    """

    def __init__(self, margin: float = 0.1, negatives: str = "all") -> None:
        super().__init__()
        if negatives not in ("all", "hardest"):
            raise ValueError(f"negatives must be 'all' or 'hardest', got {negatives!r}")
        self.margin, self.negatives = margin, negatives
        similarity = DotProductSimilarity(normalize_embeddings=False)
        self.triplet = TripletMarginLoss(margin=margin, distance=similarity, reducer=SumReducer())
        self.miner = BatchHardMiner(distance=similarity) if negatives == "hardest" else None

    def forward(self, mapped: Tensor, labels: Tensor, class_embeddings: Tensor) -> Tensor:
        num_classes = class_embeddings.shape[0]
        ref_labels = torch.arange(num_classes, device=labels.device)
        if self.miner is None:
            triplets = _all_negative_triplets(labels, num_classes)
        else:
            triplets = self.miner(mapped, labels, class_embeddings, ref_labels)
        total = self.triplet(mapped, labels, triplets, class_embeddings, ref_labels)
        return total / len(labels)


@ALIGNERS.register("devise")
class DeViSE(GradientAligner):
    """Visual features ``[B, image_dim]`` → the frozen label-embedding space ``[B, d_txt]``.

    Args:
        image_dim: size of the (frozen) visual features.
        class_embeddings: ``[C, d_txt]`` embeddings of the training label names; L2-normalised
            and stored as a buffer (saved with the model, never trained).
        margin: hinge margin (0.1 in the paper).
        hidden: ``None`` for the paper's linear map ``M`` (no bias); an int for an MLP
            ``Linear → ReLU → Linear`` with that hidden width.
        negatives: ``"all"`` (paper) or ``"hardest"``; see :class:`HingeRankLoss`.
        targets: ``"labels"`` (paper: class-name embeddings) or ``"captions"`` (each image's own caption
            embedding, the batch's other distinct captions as negatives; see the module docstring).

    Batch: ``"image"`` float ``[B, image_dim]`` and ``"label"`` int ``[B]`` in ``[0, C)``; with
    ``targets="captions"``, ``"text"`` float ``[B, d_txt]`` (the captions' frozen embeddings) instead of labels.
    """

    inputs = {"image": "vector", "text": "vector", "label": "class"}
    auto_inputs = ("image_dim", "class_embeddings")

    @classmethod
    def from_inputs(cls, dims, class_embeddings: Tensor | None = None, **kwargs) -> "DeViSE":
        """Build from the image feature size and the frozen class-name embeddings [C, d_txt]."""
        if class_embeddings is None:
            raise ValueError("DeViSE needs class_embeddings [C, d_txt] (text embeddings of the label names)")
        return cls(image_dim=dims["image"], class_embeddings=class_embeddings, **kwargs)

    def __init__(
        self,
        image_dim: int,
        class_embeddings: Tensor,
        margin: float = 0.1,
        hidden: int | None = None,
        negatives: str = "all",
        targets: str = "labels",
    ) -> None:
        super().__init__()
        if targets not in ("labels", "captions"):
            raise ValueError(f"targets must be 'labels' or 'captions', got {targets!r}")
        self.targets = targets
        class_embeddings = torch.as_tensor(class_embeddings, dtype=torch.float32)
        if class_embeddings.dim() != 2 or class_embeddings.shape[0] < 2:
            raise ValueError(f"class_embeddings must be [C >= 2, d_txt], got shape {tuple(class_embeddings.shape)}")
        self.image_dim, self.margin, self.hidden = image_dim, margin, hidden
        self.text_dim = int(class_embeddings.shape[1])
        self.register_buffer("class_embeddings", F.normalize(class_embeddings, dim=-1))
        if hidden is None:
            self.map = nn.Linear(image_dim, self.text_dim, bias=False)
        else:
            self.map = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU(), nn.Linear(hidden, self.text_dim))
        self.criterion = HingeRankLoss(margin, negatives)

    @property
    def num_classes(self) -> int:
        return int(self.class_embeddings.shape[0])

    def _map(self, x: Tensor) -> Tensor:
        if x.dim() != 2 or x.shape[-1] != self.image_dim:
            raise ValueError(f"image features must be [B, {self.image_dim}], got shape {tuple(x.shape)}")
        return self.map(x.to(self.class_embeddings.device, torch.float32))

    def _label_space(self, class_embeddings: Tensor | None) -> Tensor:
        if class_embeddings is None:
            return self.class_embeddings
        t = torch.as_tensor(class_embeddings, dtype=torch.float32, device=self.class_embeddings.device)
        if t.dim() != 2 or t.shape[1] != self.text_dim:
            raise ValueError(f"class_embeddings must be [C, {self.text_dim}], got shape {tuple(t.shape)}")
        return F.normalize(t, dim=-1)

    def encode(self, modality: str, x: Tensor) -> Tensor:
        """``"image"``: normalised mapped features ``[N, d_txt]``; ``"text"``: normalised ``x`` (the frozen space)."""
        self._check_modality(modality)
        if modality == "image":
            return F.normalize(self._map(x), dim=-1)
        if x.dim() != 2 or x.shape[-1] != self.text_dim:
            raise ValueError(f"text embeddings must be [N, {self.text_dim}], got shape {tuple(x.shape)}")
        return F.normalize(x.float(), dim=-1)

    def scores(self, x: Tensor, class_embeddings: Tensor | None = None) -> Tensor:
        """Compatibility ``t_j . M v`` ``[N, C]`` of image features against label embeddings."""
        return self._map(x) @ self._label_space(class_embeddings).T

    def loss(self, batch: dict) -> Tensor:
        """Hinge rank loss of ``batch["image"]`` against the label embeddings of ``batch["label"]`` (or, with
        ``targets="captions"``, against the batch's distinct caption embeddings ``batch["text"]``)."""
        if self.targets == "captions":
            return self._caption_loss(batch)
        x, labels = batch["image"], torch.as_tensor(batch["label"])
        if labels.dim() != 1 or len(labels) != len(x):
            raise ValueError(f"label must be [B={len(x)}] ints, got shape {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.min() < 0 or labels.max() >= self.num_classes:
            raise ValueError(f"label must hold ints in [0, {self.num_classes}), got {labels.dtype} "
                             f"in [{labels.min().item()}, {labels.max().item()}]")
        labels = labels.long().to(self.class_embeddings.device)
        return self.criterion(self._map(x), labels, self.class_embeddings)

    def _caption_loss(self, batch: dict) -> Tensor:
        x, t = batch["image"], torch.as_tensor(batch["text"])
        if t.dim() != 2 or t.shape != (len(x), self.text_dim):
            raise ValueError(f"text must be caption embeddings [B={len(x)}, {self.text_dim}], got {tuple(t.shape)}")
        t = F.normalize(t.to(self.class_embeddings.device, torch.float32), dim=-1)
        # a caption repeated in the batch ("A frog.") is one label, not a negative of itself
        labels_space, labels = torch.unique(t, dim=0, return_inverse=True)
        if len(labels_space) < 2:
            raise ValueError("targets='captions' needs at least two distinct captions in a batch")
        return self.criterion(self._map(x), labels, labels_space)

    @torch.no_grad()
    def predict(self, x: Tensor, class_embeddings: Tensor | None = None, k: int = 5) -> Tensor:
        """Top-``k`` label indices ``[N, k]`` (best first) among the training labels or ``class_embeddings``.

        Pass the embeddings of other (e.g. unseen) label names as ``class_embeddings`` for zero-shot.
        """
        s = self.scores(x, class_embeddings)
        if not 1 <= k <= s.shape[1]:
            raise ValueError(f"k={k} must be in [1, {s.shape[1]}] (the number of candidate labels)")
        return s.topk(k, dim=1).indices


# ---- zero-shot evaluation (pure functions) ---------------------------------------------------


class _Predictor(Protocol):
    def predict(self, x: Tensor, class_embeddings: Tensor | None = None, k: int = 5) -> Tensor: ...


def flat_hit_at_k(pred_topk: Tensor, labels: Tensor, ks: Sequence[int] = (1, 2, 5)) -> dict[str, float]:
    """Flat hit@k: fraction of rows whose label is among the first k of ``pred_topk`` ``[N, K]`` (K >= max ks).

    Returns ``{"hit@1": ..., "hit@2": ..., ...}``; NaN when there are no rows.
    """
    pred_topk, labels = torch.as_tensor(pred_topk), torch.as_tensor(labels)
    if pred_topk.dim() != 2 or labels.dim() != 1 or len(pred_topk) != len(labels):
        raise ValueError(
            f"pred_topk must be [N, K] and labels [N]; got {tuple(pred_topk.shape)} and {tuple(labels.shape)}"
        )
    if max(ks) > pred_topk.shape[1]:
        raise ValueError(
            f"hit@{max(ks)} needs at least {max(ks)} predictions per row, pred_topk has {pred_topk.shape[1]}"
        )
    hits = pred_topk == labels.to(pred_topk.device).unsqueeze(1)
    n = len(labels)
    return {f"hit@{k}": (hits[:, :k].any(dim=1).sum().item() / n if n else float("nan")) for k in ks}


def zero_shot_eval(
    model: _Predictor,
    x: Tensor,
    labels: Tensor,
    class_embeddings: Tensor,
    seen_mask: Tensor,
    ks: Sequence[int] = (1, 2, 5),
) -> dict[str, dict[str, float]]:
    """Zero-shot flat hit@k of ``model.predict`` on features ``x`` [N, d] with labels [N] in ``[0, C)``.

    ``class_embeddings`` [C, d_txt] covers seen and unseen labels; ``seen_mask`` [C] (bool) marks
    the labels seen in training. Returns

    * ``"seen"`` / ``"unseen"``: rows of seen / unseen classes, searching ALL C labels (the
      generalised protocol: seen labels compete with unseen ones);
    * ``"unseen_only"``: rows of unseen classes, searching only the unseen labels (the classic
      zero-shot protocol);
    * ``"harmonic"``: harmonic mean of ``seen`` and ``unseen`` per k (Xian et al.'s GZSL summary).
    """
    x, labels = torch.as_tensor(x), torch.as_tensor(labels).long().cpu()
    class_embeddings = torch.as_tensor(class_embeddings)
    seen_mask = torch.as_tensor(seen_mask, dtype=torch.bool).cpu()
    num_classes = len(class_embeddings)
    if seen_mask.shape != (num_classes,):
        raise ValueError(f"seen_mask must be [C={num_classes}] bools, got shape {tuple(seen_mask.shape)}")
    if len(labels) != len(x):
        raise ValueError(f"x has {len(x)} rows but labels has {len(labels)}")
    if len(labels) and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"labels must lie in [0, {num_classes}), got [{labels.min().item()}, {labels.max().item()}]")
    k = max(ks)
    unseen_ids = (~seen_mask).nonzero(as_tuple=True)[0]
    row_seen = seen_mask[labels]

    pred_all = model.predict(x, class_embeddings=class_embeddings, k=min(k, num_classes)).cpu()
    out = {
        "seen": flat_hit_at_k(_pad(pred_all[row_seen], k), labels[row_seen], ks),
        "unseen": flat_hit_at_k(_pad(pred_all[~row_seen], k), labels[~row_seen], ks),
    }
    if len(unseen_ids):
        x_unseen = x[(~row_seen).to(x.device)]
        pred_u = model.predict(x_unseen, class_embeddings=class_embeddings[unseen_ids.to(class_embeddings.device)],
                               k=min(k, len(unseen_ids))).cpu()
        out["unseen_only"] = flat_hit_at_k(_pad(unseen_ids[pred_u], k), labels[~row_seen], ks)
    else:
        out["unseen_only"] = {f"hit@{kk}": float("nan") for kk in ks}
    out["harmonic"] = {key: _harmonic(out["seen"][key], out["unseen"][key]) for key in out["seen"]}
    return out


def _pad(pred: Tensor, k: int) -> Tensor:
    """Pad top-k predictions with -1 (never a label) when fewer than k candidates exist."""
    if pred.shape[1] >= k:
        return pred
    return torch.cat([pred, pred.new_full((len(pred), k - pred.shape[1]), -1)], dim=1)


def _harmonic(a: float, b: float) -> float:
    if a != a or b != b:  # NaN: a group without rows
        return float("nan")
    return 2 * a * b / (a + b) if a + b > 0 else 0.0
