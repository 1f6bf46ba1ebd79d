"""Decision-level (late) fusion: one classifier per modality, then a rule combining their class
probabilities.

The combining rules (operators) are implemented once, in :func:`combine_probabilities`
(``mean``, ``weighted``, ``vote``), plus stacking, which learns the rule:

* ``decision/mean`` (:class:`MeanFusion`): mean of the present modalities' probabilities;
* ``decision/weighted`` (:class:`WeightedFusion`): weighted mean (soft weighted voting), weights
  given or set to each modality's validation accuracy, measured out-of-fold on the training set;
* ``decision/vote`` (:class:`VoteFusion`): majority vote of the per-modality predictions, ties
  broken by the summed probability;
* ``decision/stacking`` (:class:`StackingFusion`): a meta-learner trained on *out-of-fold*
  per-modality probabilities (``cross_val_predict``, as ``sklearn.ensemble.StackingClassifier``
  does), so the meta-learner never sees predictions on samples the base models were fitted on.

These are scikit-learn estimators over per-modality feature arrays: ``fit(inputs, y)`` with
``inputs: dict[str, array [N, d_m]]`` (``y`` defaults to ``inputs["label"]``), ``predict_proba``,
``predict``. They fit one classifier per modality (default ``LogisticRegression``).
:class:`LateFusionHeads` is the ``nn.Module`` counterpart for the gradient Trainer: one MLP head
per modality trained jointly with per-head cross-entropy, combined by ``mean`` or ``vote``.

Missing modalities (key absent, or ``inputs["<m>_mask"]`` bool [N]): the modality's vote is
dropped for those samples; a sample with no modality at all gets the uniform distribution.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from sklearn.base import BaseEstimator, ClassifierMixin, clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import cross_val_predict
from torch import Tensor

from fusion._common import batch_size, presence
from fusion.base import FUSIONS
from fusion.feature_level import FeatureFusion

log = logging.getLogger(__name__)

__all__ = [
    "DecisionFusion",
    "LateFusionHeads",
    "MeanFusion",
    "StackingFusion",
    "VoteFusion",
    "WeightedFusion",
    "combine_probabilities",
]

COMBINE_OPERATORS = ("mean", "weighted", "vote")


def combine_probabilities(
    probas: Tensor, present: Tensor, operator: str, weights: Tensor | None = None
) -> Tensor:
    """Combine per-modality class probabilities into one distribution per sample.

    ``probas`` [M, B, C], ``present`` bool [M, B] → [B, C] (rows sum to 1).

    * ``mean``: mean over present modalities;
    * ``weighted``: ``Σ w_m p_m / Σ w_m`` over present modalities, ``weights`` [M] ≥ 0;
    * ``vote``: ``(votes + psum / (n + 1)) / (n + n / (n + 1))`` where ``votes[c]`` counts the
      present modalities whose argmax is ``c``, ``psum`` is the summed probability and ``n`` the
      number of present modalities. ``psum / (n + 1) < 1``, so its argmax is the majority
      vote with ties broken by the summed probability.

    Samples with no present modality get the uniform distribution.
    """
    if probas.dim() != 3 or present.shape != probas.shape[:2]:
        raise ValueError(
            f"probas must be [M, B, C] and present [M, B]; got {tuple(probas.shape)} and {tuple(present.shape)}"
        )
    num_classes = probas.shape[-1]
    pres = present.to(probas.dtype).unsqueeze(-1)  # [M, B, 1]
    n = pres.sum(dim=0)  # [B, 1]
    uniform = torch.full_like(probas[0], 1.0 / num_classes)
    if operator in ("mean", "weighted"):
        if operator == "weighted":
            if weights is None or weights.shape != (probas.shape[0],):
                raise ValueError(f"operator 'weighted' needs weights [M={probas.shape[0]}]; got {weights}")
            w = weights.to(probas).view(-1, 1, 1) * pres
        else:
            w = pres
        total = w.sum(dim=0)
        combined = (w * probas).sum(dim=0) / total.clamp_min(torch.finfo(probas.dtype).tiny)
        return torch.where(total > 0, combined, uniform)
    if operator == "vote":
        votes = (F.one_hot(probas.argmax(dim=-1), num_classes).to(probas.dtype) * pres).sum(dim=0)
        psum = (probas * pres).sum(dim=0)
        score = (votes + psum / (n + 1)) / (n + n / (n + 1)).clamp_min(torch.finfo(probas.dtype).tiny)
        return torch.where(n > 0, score, uniform)
    raise ValueError(f"unknown combine operator {operator!r}; known: {COMBINE_OPERATORS}")


def _as_numpy(x: Any) -> np.ndarray:
    return x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)


def _sklearn_arrays(est: Any) -> list[np.ndarray]:
    """Learned weight arrays of a linear or MLP estimator (the last step of a Pipeline)."""
    est = est[-1] if hasattr(est, "steps") else est
    arrays = [getattr(est, a) for a in ("coef_", "intercept_") if hasattr(est, a)]
    for a in ("coefs_", "intercepts_"):
        arrays += list(getattr(est, a, []))
    return arrays


class DecisionFusion(ClassifierMixin, BaseEstimator):
    """One scikit-learn classifier per modality, combined by ``operator`` (set by subclasses).

    Parameters
    ----------
    in_dims: modality → feature size; selects and orders the modalities and checks shapes.
        If ``None``, the modalities are the keys of ``fit``'s inputs (minus ``label`` and masks).
    num_classes: labels are ``0..num_classes-1``; if ``None``, the classes seen in ``fit``.
    estimator: an unfitted classifier with ``predict_proba`` (cloned for each modality), or a
        dict modality → classifier. Default ``LogisticRegression(max_iter=1000)``.
    cv: cross-validation splitting for out-of-fold predictions (``weighted``, ``stacking``);
        an int means ``StratifiedKFold(cv)``, as in ``cross_val_predict``.

    Inputs are ``dict[str, array]``: ``[N, d_m]`` per modality (``[N, L, d_m]`` token arrays are
    averaged over ``L``), optional masks ``"<m>_mask"`` bool [N]. Fitted: ``classes_``,
    ``modalities_``, ``estimators_`` (dict modality → fitted classifier).
    """

    level = "decision"
    operator = ""
    fit_input = "batch"  # Trainer.fit calls fit(inputs) with the whole training dict ("label" included)

    def __init__(
        self,
        in_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        estimator: Any = None,
        cv: Any = 5,
    ) -> None:
        self.in_dims = in_dims
        self.num_classes = num_classes
        self.estimator = estimator
        self.cv = cv

    @property
    def name(self) -> str:
        """Report name, ``"<level>/<operator>"``."""
        return f"{self.level}/{self.operator}"

    @property
    def modalities(self) -> tuple[str, ...]:
        if self.in_dims is not None:
            return tuple(self.in_dims)
        if isinstance(self.estimator, Mapping):
            return tuple(self.estimator)
        if hasattr(self, "modalities_"):
            return self.modalities_
        raise AttributeError("modalities are known after fit (or from in_dims / a dict estimator)")

    # -- inputs ---------------------------------------------------------------------------
    def _base_estimator(self, modality: str) -> Any:
        est = self.estimator
        if isinstance(est, Mapping):
            if modality not in est:
                raise ValueError(f"estimator dict has no entry for modality {modality!r}; it has {sorted(est)}")
            est = est[modality]
        return clone(est) if est is not None else LogisticRegression(max_iter=1000)

    def _arrays(
        self, inputs: Mapping[str, Any], modalities: tuple[str, ...]
    ) -> tuple[dict[str, np.ndarray | None], np.ndarray]:
        """Per-modality float arrays [N, d_m] (zero rows where absent, ``None`` if the key is
        absent) and presence [M, N] bool."""
        n = batch_size(inputs, modalities)
        xs: dict[str, np.ndarray | None] = {}
        present = np.stack([presence(inputs, m, n).cpu().numpy() for m in modalities])
        for i, m in enumerate(modalities):
            if inputs.get(m) is None:
                xs[m] = None
                continue
            x = _as_numpy(inputs[m]).astype(np.float64, copy=False)
            if x.ndim == 3:
                x = x.mean(axis=1)
            if x.ndim != 2 or (self.in_dims is not None and x.shape[1] != self.in_dims[m]):
                want = self.in_dims[m] if self.in_dims is not None else "d"
                raise ValueError(f"inputs[{m!r}] has shape {x.shape}; expected [N, {want}] (or [N, L, {want}])")
            xs[m] = np.where(present[i][:, None], x, 0.0)
        return xs, present

    def _align_columns(self, proba: np.ndarray, classes: np.ndarray) -> np.ndarray:
        """Probabilities [N, len(classes)] → [N, C] with columns in ``self.classes_`` order
        (zero for classes a classifier never saw)."""
        out = np.zeros((proba.shape[0], len(self.classes_)))
        out[:, np.searchsorted(self.classes_, classes)] = proba
        return out

    # -- fitting --------------------------------------------------------------------------
    def fit(self, inputs: Mapping[str, Any], y: Any = None) -> "DecisionFusion":
        """Fit one classifier per modality on the samples where it is present, then the combiner."""
        if y is None:
            if inputs.get("label") is None:
                raise ValueError(f"fit needs y or inputs['label']; inputs keys: {sorted(inputs)}")
            y = inputs["label"]
        y = _as_numpy(y)
        if self.in_dims is None and not isinstance(self.estimator, Mapping):
            self.modalities_ = tuple(
                k for k in inputs if k != "label" and not k.endswith("_mask") and inputs[k] is not None
            )
        else:
            self.modalities_ = self.modalities
        if len(self.modalities_) < 2:
            raise ValueError(f"decision fusion needs at least two modalities; got {self.modalities_}")
        xs, present = self._arrays(inputs, self.modalities_)
        if len(y) != present.shape[1]:
            raise ValueError(f"y has {len(y)} labels but the inputs have {present.shape[1]} samples")
        self.classes_ = np.arange(self.num_classes) if self.num_classes is not None else np.unique(y)
        unknown = np.setdiff1d(np.unique(y), self.classes_)
        if unknown.size:
            raise ValueError(f"labels {unknown.tolist()} are outside classes 0..{len(self.classes_) - 1}")
        self.estimators_ = {}
        for i, m in enumerate(self.modalities_):
            rows = present[i]
            if xs[m] is None or not rows.any():
                raise ValueError(f"modality {m!r} is absent from every training sample; cannot fit its classifier")
            self.estimators_[m] = self._base_estimator(m).fit(xs[m][rows], y[rows])
        self._fit_combiner(xs, present, y)
        return self

    def _fit_combiner(self, xs: dict[str, np.ndarray], present: np.ndarray, y: np.ndarray) -> None:
        """Fit whatever the operator learns on top of the per-modality classifiers (default: nothing)."""

    def _oof_proba(self, xs: dict[str, np.ndarray], present: np.ndarray, y: np.ndarray) -> np.ndarray:
        """Out-of-fold probabilities [M, N, C] (uniform where the modality is absent)."""
        out = np.full((len(self.modalities_), len(y), len(self.classes_)), 1.0 / len(self.classes_))
        for i, m in enumerate(self.modalities_):
            rows = present[i]
            p = cross_val_predict(self._base_estimator(m), xs[m][rows], y[rows], cv=self.cv, method="predict_proba")
            out[i, rows] = self._align_columns(p, np.unique(y[rows]))  # columns in sorted-label order
        return out

    # -- prediction -----------------------------------------------------------------------
    def modality_proba(self, inputs: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """Per-modality probabilities [M, N, C] (uniform where absent) and presence [M, N] bool."""
        if not hasattr(self, "estimators_"):
            raise AttributeError(f"{type(self).__name__} is not fitted; call fit first")
        xs, present = self._arrays(inputs, self.modalities_)
        out = np.full((len(self.modalities_), present.shape[1], len(self.classes_)), 1.0 / len(self.classes_))
        for i, m in enumerate(self.modalities_):
            if present[i].any():
                est = self.estimators_[m]
                out[i, present[i]] = self._align_columns(est.predict_proba(xs[m][present[i]]), est.classes_)
        return out, present

    def _combine(self, probas: np.ndarray, present: np.ndarray) -> np.ndarray:
        return combine_probabilities(torch.from_numpy(probas), torch.from_numpy(present), self.operator).numpy()

    def predict_proba(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Combined class probabilities [N, C] (columns in ``classes_`` order)."""
        return self._combine(*self.modality_proba(inputs))

    def predict(self, inputs: Mapping[str, Any]) -> np.ndarray:
        """Predicted labels [N]."""
        return self.classes_[self.predict_proba(inputs).argmax(axis=1)]

    # -- parameter counts -----------------------------------------------------------------
    def fusion_parameters(self) -> list[np.ndarray]:
        """Arrays fitted by the combiner itself (none for mean and vote)."""
        return []

    def all_parameters(self) -> list[np.ndarray]:
        """Per-modality classifiers' weight arrays (linear / MLP estimators) plus the combiner's."""
        arrays = [a for est in getattr(self, "estimators_", {}).values() for a in _sklearn_arrays(est)]
        return arrays + self.fusion_parameters()


@FUSIONS.register("decision/mean")
class MeanFusion(DecisionFusion):
    """Mean of the present modalities' class probabilities."""

    operator = "mean"


@FUSIONS.register("decision/vote")
class VoteFusion(DecisionFusion):
    """Majority vote of the per-modality predictions; ties broken by summed probability."""

    operator = "vote"


@FUSIONS.register("decision/weighted")
class WeightedFusion(DecisionFusion):
    """Weighted mean of probabilities (soft weighted voting).

    ``weights``: dict modality → weight ≥ 0; if ``None``, each modality's weight is its
    classifier's out-of-fold accuracy on the training set (``validation_accuracy_``), so no
    separate validation split is needed and no sample scores a model that was fitted on it.
    Fitted: ``weights_`` [M] in ``modalities_`` order.
    """

    operator = "weighted"

    def __init__(
        self,
        in_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        estimator: Any = None,
        cv: Any = 5,
        weights: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(in_dims, num_classes, estimator, cv)
        self.weights = weights

    def _fit_combiner(self, xs, present, y) -> None:
        if self.weights is not None:
            if set(self.weights) != set(self.modalities_):
                raise ValueError(
                    f"weights has keys {sorted(self.weights)}; expected the modalities {sorted(self.modalities_)}"
                )
            self.weights_ = np.array([float(self.weights[m]) for m in self.modalities_])
            if (self.weights_ < 0).any():
                raise ValueError(f"weights must be >= 0; got {dict(self.weights)}")
            return
        oof = self._oof_proba(xs, present, y)
        acc = [(self.classes_[oof[i, present[i]].argmax(1)] == y[present[i]]).mean() for i in range(len(oof))]
        self.validation_accuracy_ = dict(zip(self.modalities_, map(float, acc)))
        self.weights_ = np.array(acc)
        log.info("decision/weighted: out-of-fold accuracies %s", self.validation_accuracy_)

    def _combine(self, probas: np.ndarray, present: np.ndarray) -> np.ndarray:
        return combine_probabilities(
            torch.from_numpy(probas), torch.from_numpy(present), "weighted", torch.from_numpy(self.weights_)
        ).numpy()

    def fusion_parameters(self) -> list[np.ndarray]:
        return [self.weights_] if hasattr(self, "weights_") else []


@FUSIONS.register("decision/stacking")
class StackingFusion(DecisionFusion):
    """A meta-learner (``final_estimator``, default ``LogisticRegression``) on the per-modality
    probabilities, trained on their out-of-fold values as ``StackingClassifier`` does.

    Meta-features are ``[p_1 - 1/C, …, p_M - 1/C]`` [N, M·C] with an absent modality's block set
    to 0, so it contributes nothing to a linear meta-learner. At prediction time the base
    classifiers refitted on all training data give the meta-features. Fitted: ``final_estimator_``
    and ``oof_meta_features_`` (the meta-learner's training inputs).
    """

    operator = "stacking"

    def __init__(
        self,
        in_dims: Mapping[str, int] | None = None,
        num_classes: int | None = None,
        estimator: Any = None,
        cv: Any = 5,
        final_estimator: Any = None,
    ) -> None:
        super().__init__(in_dims, num_classes, estimator, cv)
        self.final_estimator = final_estimator

    def meta_features(self, probas: np.ndarray, present: np.ndarray) -> np.ndarray:
        """[M, N, C] probabilities and [M, N] presence → centred meta-features [N, M·C]."""
        centred = (probas - 1.0 / probas.shape[-1]) * present[..., None]
        return centred.transpose(1, 0, 2).reshape(probas.shape[1], -1)

    def _fit_combiner(self, xs, present, y) -> None:
        self.oof_meta_features_ = self.meta_features(self._oof_proba(xs, present, y), present)
        final = self.final_estimator if self.final_estimator is not None else LogisticRegression(max_iter=1000)
        self.final_estimator_ = clone(final).fit(self.oof_meta_features_, y)

    def predict_proba(self, inputs: Mapping[str, Any]) -> np.ndarray:
        meta = self.meta_features(*self.modality_proba(inputs))
        return self._align_columns(self.final_estimator_.predict_proba(meta), self.final_estimator_.classes_)

    def fusion_parameters(self) -> list[np.ndarray]:
        return _sklearn_arrays(self.final_estimator_) if hasattr(self, "final_estimator_") else []


class LateFusionHeads(FeatureFusion):
    """``nn.Module`` decision-level fusion for the gradient Trainer: one MLP classifier per
    modality (``encoders[m]``: ``in_dims[m] → hidden → num_classes``), trained jointly by
    ``loss(batch)`` = mean over modalities of each head's cross-entropy on the samples where
    that modality is present; ``forward`` returns the log of the ``combine``d probabilities
    (``mean`` or ``vote``, :func:`combine_probabilities`), so its softmax is the fused
    distribution. ``name`` is ``decision/<combine>``. No fusion parameters.
    """

    level = "decision"

    def __init__(
        self,
        in_dims: Mapping[str, int],
        num_classes: int,
        combine: str = "mean",
        hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        # the per-modality "encoders" are the classifiers: their output size is num_classes
        super().__init__(in_dims, num_classes, embed_dim=num_classes, hidden=hidden, dropout=dropout)
        if combine not in ("mean", "vote"):
            raise ValueError(f"combine must be 'mean' or 'vote', got {combine!r}")
        self.operator = combine

    def modality_logits(self, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Per-modality logits [M, B, C] (zero where absent) and presence [M, B] bool."""
        z, present = self.encode(inputs)
        return z.transpose(0, 1), present.transpose(0, 1)

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Mean over modalities of the per-head cross-entropy on present samples."""
        if batch.get("label") is None:
            raise KeyError(f"{type(self).__name__}.loss needs batch['label']; batch keys: {sorted(batch)}")
        logits, present = self.modality_logits(batch)
        labels = torch.as_tensor(batch["label"], device=logits.device).long()
        losses = [F.cross_entropy(lg[p], labels[p]) for lg, p in zip(logits, present) if p.any()]
        if not losses:  # nothing present: a zero that still has a graph, so the Trainer can step
            return logits.sum() * 0.0
        return torch.stack(losses).mean()

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        """Log of the combined probabilities [B, C] (used as logits)."""
        logits, present = self.modality_logits(inputs)
        combined = combine_probabilities(logits.softmax(dim=-1), present, self.operator)
        return combined.clamp_min(torch.finfo(combined.dtype).tiny).log()
