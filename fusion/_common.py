"""Pieces shared by the fusion strategies: the ``nn.Module`` base class, the missing-modality
convention, and parameter counting for the cost report.

Missing modalities
------------------
* **key absent** (``"depth" not in inputs``, or ``inputs["depth"] is None``): the modality is
  missing for every sample of the batch;
* **per-sample mask** ``inputs["depth_mask"]``: bool ``[B]``, ``True`` where the modality is
  present. Rows where it is ``False`` are never read (they are zeroed before any encoder, so
  they may hold anything, NaN included).

Parameter counts
----------------
Every strategy exposes ``fusion_parameters()``: the parameters of everything *after* the
per-modality encoders (the fusion operator and the classifier head it feeds). Data-level
strategies have no per-modality encoder, so all their parameters are fusion parameters;
decision-level combiners count what they fit on top of the per-modality models.
:func:`fusion_module_params` and :func:`model_params` turn these into numbers for any strategy.
"""
from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

MASK_SUFFIX = "_mask"


def mask_key(modality: str) -> str:
    """Key of the per-sample presence mask of ``modality`` in an inputs dict."""
    return modality + MASK_SUFFIX


def batch_size(inputs: Mapping[str, Any], modalities: Sequence[str]) -> int:
    """Number of samples in ``inputs``, from its first present modality (or mask, or label)."""
    sizes = {m: len(inputs[m]) for m in modalities if inputs.get(m) is not None}
    if sizes:
        if len(set(sizes.values())) > 1:
            raise ValueError(f"modalities have different batch sizes: {sizes}")
        return next(iter(sizes.values()))
    for key in [mask_key(m) for m in modalities] + ["label"]:
        if inputs.get(key) is not None:
            return len(inputs[key])
    raise ValueError(
        f"none of the modalities {tuple(modalities)} (nor a mask or 'label') is in the inputs "
        f"(keys: {sorted(inputs)}); cannot tell the batch size"
    )


def presence(inputs: Mapping[str, Any], modality: str, n: int, device: torch.device | None = None) -> Tensor:
    """Bool ``[n]``: where ``modality`` is present (see the module docstring for the convention)."""
    if inputs.get(modality) is None:
        return torch.zeros(n, dtype=torch.bool, device=device)
    mask = inputs.get(mask_key(modality))
    if mask is None:
        return torch.ones(n, dtype=torch.bool, device=device)
    mask = torch.as_tensor(mask, device=device)
    if mask.shape != (n,):
        raise ValueError(
            f"inputs[{mask_key(modality)!r}] has shape {tuple(mask.shape)}; expected bool [{n}] (one flag per sample)"
        )
    return mask.bool()


def zero_missing_rows(x: Tensor, present: Tensor) -> Tensor:
    """``x`` [B, ...] with the rows of absent samples set to 0 (so NaN placeholders never propagate)."""
    return torch.where(present.view(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))


def check_in_dims(in_dims: Mapping[str, int], num_classes: int) -> None:
    """Validate a strategy's ``in_dims`` (≥ 2 modalities, positive sizes) and ``num_classes`` (≥ 2)."""
    if len(in_dims) < 2:
        raise ValueError(f"fusion needs at least two modalities; in_dims has {dict(in_dims)}")
    bad = {m: d for m, d in in_dims.items() if not (isinstance(d, int) and d > 0)}
    if bad:
        raise ValueError(f"in_dims values must be positive ints; got {bad}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be >= 2, got {num_classes}")


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    """Two-layer perceptron ``Linear → ReLU → Dropout → Linear``, the encoders' and heads' shape."""
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class FusionModule(nn.Module):
    """Base of the ``nn.Module`` strategies (data, feature, and jointly trained decision level).

    Subclasses set ``level`` and ``operator``, ``modalities`` and ``num_classes``, keep their
    per-modality encoders (if any) in ``self.encoders`` and implement
    ``forward(inputs: dict[str, Tensor]) -> logits [B, num_classes]``. Keys that are not
    modalities (``"label"``, masks, ...) are ignored by ``forward``.

    What a strategy needs is declared, so runners never branch on its name:

    * ``input_kind``: the view it is fed: ``"pooled"`` (one feature vector per modality, the default),
      ``"grid"`` (feature tokens [L, d]), ``"raw"`` (flattened raw values) or ``"pixels"`` (uint8 images);
    * ``required_modalities``: modalities it cannot run without (e.g. RGB + depth), default none;
    * :meth:`from_inputs`: how it is built from the data's dimensions.
    """

    level: str = ""
    operator: str = ""
    modalities: tuple[str, ...] = ()
    num_classes: int = 0
    input_kind: str = "pooled"
    required_modalities: tuple[str, ...] = ()

    @classmethod
    def from_inputs(cls, in_dims: Mapping[str, int], num_classes: int, **kwargs: Any) -> "FusionModule":
        """Build from ``in_dims`` (modality → feature size of ``input_kind``) and the config's kwargs."""
        return cls(in_dims=in_dims, num_classes=num_classes, **kwargs)

    @property
    def name(self) -> str:
        """Report name, ``"<level>/<operator>"``."""
        return f"{self.level}/{self.operator}"

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Cross-entropy of ``forward(batch)`` against ``batch["label"]`` (int [B])."""
        if batch.get("label") is None:
            raise KeyError(f"{type(self).__name__}.loss needs batch['label']; batch keys: {sorted(batch)}")
        logits = self(batch)
        return F.cross_entropy(logits, torch.as_tensor(batch["label"], device=logits.device).long())

    @torch.no_grad()
    def predict_proba(self, inputs: Mapping[str, Any]) -> Tensor:
        """Class probabilities [B, num_classes], computed in eval mode without gradients."""
        was_training = self.training
        self.eval()
        try:
            return self(inputs).softmax(dim=-1)
        finally:
            self.train(was_training)

    def fusion_parameters(self) -> list[nn.Parameter]:
        """Parameters of the fusion operator and head: all parameters not in ``self.encoders``."""
        encoders = getattr(self, "encoders", None)
        excluded = {id(p) for p in encoders.parameters()} if isinstance(encoders, nn.Module) else set()
        return [p for p in self.parameters() if id(p) not in excluded]

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _device(self, inputs: Mapping[str, Any]) -> torch.device:
        for m in self.modalities:
            if isinstance(inputs.get(m), Tensor):
                return inputs[m].device
        return next(self.parameters()).device


def build_strategy(cls: Any, in_dims: Mapping[str, int], num_classes: int, seed: int, **kwargs: Any) -> Any:
    """A fresh strategy of class ``cls`` for one fit, from the data's dims and config kwargs (plain YAML values).

    ``cls.from_inputs`` when the class defines it; otherwise (scikit-learn combiners) the constructor, where an
    ``estimator`` / ``final_estimator`` given as a mapping is the kwargs of a ``LogisticRegression`` and an int
    ``cv`` is a ``StratifiedKFold`` shuffled with ``seed``. The torch RNG is seeded first, so initialisations differ
    only by seed.
    """
    import inspect

    torch.manual_seed(seed)
    if hasattr(cls, "from_inputs"):
        return cls.from_inputs(in_dims, num_classes, **kwargs)
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import StratifiedKFold

    kwargs = dict(kwargs)
    params = inspect.signature(cls).parameters
    for k in ("estimator", "final_estimator"):
        if isinstance(kwargs.get(k), Mapping):
            kwargs[k] = LogisticRegression(**{"max_iter": 1000, **kwargs[k]})
    if "cv" in params:
        cv = kwargs.get("cv", params["cv"].default)
        if isinstance(cv, int):
            kwargs["cv"] = StratifiedKFold(cv, shuffle=True, random_state=seed)
    return cls(in_dims=dict(in_dims), num_classes=num_classes, **kwargs)


def _numel(p: Any) -> int:
    return int(p.numel()) if isinstance(p, Tensor) else int(np.size(p))


def _count(params: Iterable[Any]) -> int:
    seen: set[int] = set()
    total = 0
    for p in params:
        if id(p) not in seen:
            seen.add(id(p))
            total += _numel(p)
    return total


def fusion_module_params(model: Any) -> int:
    """Number of parameters of the fusion operator alone (``model.fusion_parameters()``), any strategy."""
    return _count(model.fusion_parameters())


def model_params(model: Any) -> int:
    """Number of parameters of the whole strategy: encoders (or per-modality models) plus fusion."""
    if isinstance(model, nn.Module):
        return _count(model.parameters())
    return _count(model.all_parameters())
