"""Fusion of sequence modalities (sensors) with a small 1-D convolutional encoder per modality.

Each modality is a multichannel sequence, fed as tokens ``inputs[m]`` [B, T, C_m] (``input_kind = "grid"``: the
fusion runner's token view of ``[N, C, T]`` multi-view data, channels standardised). :class:`Conv1dEncoder` turns
one sequence into a vector: ``layers`` × (``Conv1d(kernel, padding same)`` → ReLU), then the mean and the max over
time, concatenated, → ``Linear``. It is the per-modality encoder at every level:

* ``data/conv1d`` — data level (early fusion): the channels of every modality stacked into one sequence (a missing
  modality's channels are zeros, plus one presence channel per modality) → one encoder → linear head;
* ``feature/conv1d_<op>`` for ``op`` in concat, sum, gated, tfn, lmf — feature level: the operator and head of
  :mod:`fusion.feature_level` (same missing-modality handling), with a :class:`Conv1dEncoder` in place of each
  modality's MLP encoder (the MLP encoders would only see the tokens' time average);
* ``decision/conv1d_mean`` / ``decision/conv1d_vote`` — decision level: one encoder + classifier per modality
  (:class:`fusion.decision_level.LateFusionHeads`, each head's cross-entropy on the samples where its modality is
  present), probabilities averaged (or voted) over the present modalities.

A ``[B, C_m]`` input is one time step (as the feature level takes ``[B, d]`` or ``[B, L, d]``).
Missing modalities follow :mod:`fusion._common` (key absent, or ``inputs["<m>_mask"]`` bool [B]).
"""
from __future__ import annotations

import inspect
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fusion._common import FusionModule, batch_size, check_in_dims, presence, zero_missing_rows
from fusion.base import FUSIONS
from fusion.decision_level import LateFusionHeads, combine_probabilities
from fusion.feature_level import ConcatFusion, GatedFusion, LowRankFusion, SumFusion, TensorFusion

__all__ = ["Conv1dEncoder", "Conv1dInputFusion", "Conv1dLateFusion", "conv1d_feature_fusion"]


class Conv1dEncoder(nn.Module):
    """Sequence tokens ``[B, T, in_channels]`` → ``[B, out_dim]``: ``layers`` × (Conv1d → ReLU) of ``width``
    channels (kernel ``kernel``, length kept), mean and max over time concatenated → Dropout → Linear."""

    def __init__(self, in_channels: int, out_dim: int, width: int = 32, kernel: int = 5, layers: int = 2,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if layers < 1 or kernel < 1 or width < 1:
            raise ValueError(f"layers, kernel and width must be >= 1, got {layers}, {kernel}, {width}")
        convs: list[nn.Module] = []
        for i in range(layers):
            convs += [nn.Conv1d(in_channels if i == 0 else width, width, kernel, padding=kernel // 2), nn.ReLU()]
        self.in_channels = in_channels
        self.convs = nn.Sequential(*convs)
        self.out = nn.Sequential(nn.Dropout(dropout), nn.Linear(2 * width, out_dim))

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.in_channels:
            raise ValueError(f"sequence input must be tokens [B, T, {self.in_channels}], got {tuple(x.shape)}")
        h = self.convs(x.transpose(1, 2))  # [B, width, T]
        return self.out(torch.cat([h.mean(dim=2), h.amax(dim=2)], dim=1))


def _sequence(inputs: Mapping[str, Any], m: str, channels: int, present: Tensor, device, dtype) -> Tensor:
    x = torch.as_tensor(inputs[m], device=device).to(dtype)
    if x.dim() == 2:  # [B, C]: one time step (the feature level's [B, d] / [B, L, d] convention)
        x = x.unsqueeze(1)
    if x.dim() != 3 or x.shape[-1] != channels:
        raise ValueError(f"inputs[{m!r}] has shape {tuple(x.shape)}; expected sequence tokens [B, T, {channels}] "
                         f"(or one step [B, {channels}])")
    return zero_missing_rows(x, present)


def _length(x: Any) -> int:
    x = torch.as_tensor(x)
    return int(x.shape[1]) if x.dim() == 3 else 1


class _Conv1dEncoders:
    """Mixin for :class:`fusion.feature_level.FeatureFusion` subclasses: a :class:`Conv1dEncoder` per modality
    replaces the MLP encoder and gets the whole sequence (no token average)."""

    input_kind = "grid"

    def _conv_encoders(self, width: int, kernel: int, layers: int) -> None:
        self.width, self.kernel, self.conv_layers = width, kernel, layers
        self.encoders = nn.ModuleDict({m: Conv1dEncoder(d, self.embed_dim, width, kernel, layers, self.dropout)
                                       for m, d in self.in_dims.items()})

    def _encode_modality(self, inputs: Mapping[str, Any], m: str, present: Tensor, device, dtype) -> Tensor:
        return self.encoders[m](_sequence(inputs, m, self.in_dims[m], present, device, dtype))


def conv1d_feature_fusion(base: type) -> type:
    """The feature-level strategy ``base`` with a :class:`Conv1dEncoder` per modality, registered as
    ``feature/conv1d_<base.operator>`` (options: ``base``'s plus ``width``, ``kernel``, ``layers``)."""

    class Conv1dFeatureFusion(_Conv1dEncoders, base):
        operator = f"conv1d_{base.operator}"

        def __init__(self, in_dims: Mapping[str, int], num_classes: int, *args: Any, width: int = 32,
                     kernel: int = 5, layers: int = 2, **kwargs: Any) -> None:
            base.__init__(self, in_dims, num_classes, *args, **kwargs)
            self._conv_encoders(width, kernel, layers)

    sig = inspect.signature(base.__init__)
    extra = [inspect.Parameter(k, inspect.Parameter.KEYWORD_ONLY, default=v, annotation=int)
             for k, v in (("width", 32), ("kernel", 5), ("layers", 2))]
    Conv1dFeatureFusion.__init__.__signature__ = sig.replace(parameters=[*sig.parameters.values(), *extra])
    Conv1dFeatureFusion.__name__ = Conv1dFeatureFusion.__qualname__ = f"Conv1d{base.__name__}"
    Conv1dFeatureFusion.__doc__ = (f"{base.__name__} (``feature/{base.operator}``) with a 1-D conv encoder per "
                                   f"sequence modality.\n\n{base.__doc__}")
    return FUSIONS.register(f"feature/{Conv1dFeatureFusion.operator}")(Conv1dFeatureFusion)


for _base in (ConcatFusion, SumFusion, GatedFusion, TensorFusion, LowRankFusion):
    conv1d_feature_fusion(_base)


class Conv1dLateFusion(_Conv1dEncoders, LateFusionHeads):
    """Decision level: a :class:`Conv1dEncoder` classifier per modality (``[B, T, C_m]`` → logits), trained
    jointly (:class:`LateFusionHeads`' loss); probabilities combined by ``combine`` (mean or vote) over the
    present modalities. ``hidden`` is unused (kept for :class:`LateFusionHeads`' signature)."""

    def __init__(self, in_dims: Mapping[str, int], num_classes: int, combine: str = "mean", width: int = 32,
                 kernel: int = 5, layers: int = 2, hidden: int = 64, dropout: float = 0.0) -> None:
        LateFusionHeads.__init__(self, in_dims, num_classes, combine=combine, hidden=hidden, dropout=dropout)
        self.combine = combine
        self.operator = f"conv1d_{combine}"
        self._conv_encoders(width, kernel, layers)  # embed_dim = num_classes: each encoder is a classifier

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        """Log of the combined probabilities [B, C] (used as logits)."""
        logits, present = self.modality_logits(inputs)
        combined = combine_probabilities(logits.softmax(dim=-1), present, self.combine)
        return combined.clamp_min(torch.finfo(combined.dtype).tiny).log()


@FUSIONS.register("decision/conv1d_mean")
class Conv1dMeanFusion(Conv1dLateFusion):
    """:class:`Conv1dLateFusion` with the mean of the present modalities' probabilities."""

    operator = "conv1d_mean"

    def __init__(self, in_dims: Mapping[str, int], num_classes: int, width: int = 32, kernel: int = 5,
                 layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__(in_dims, num_classes, "mean", width, kernel, layers, dropout=dropout)


@FUSIONS.register("decision/conv1d_vote")
class Conv1dVoteFusion(Conv1dLateFusion):
    """:class:`Conv1dLateFusion` with a majority vote of the present modalities (ties by mean probability)."""

    operator = "conv1d_vote"

    def __init__(self, in_dims: Mapping[str, int], num_classes: int, width: int = 32, kernel: int = 5,
                 layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__(in_dims, num_classes, "vote", width, kernel, layers, dropout=dropout)


@FUSIONS.register("data/conv1d")
class Conv1dInputFusion(FusionModule):
    """Data level: every modality's channels stacked into one sequence ``[B, T, ΣC_m + M]`` (a missing
    modality's channels are zeros; one presence channel per modality, 1 where present) → one
    :class:`Conv1dEncoder` → ``hidden`` → Linear head. All modalities need the same length T."""

    level = "data"
    operator = "conv1d"
    input_kind = "grid"

    def __init__(self, in_dims: Mapping[str, int], num_classes: int, hidden: int = 64, width: int = 32,
                 kernel: int = 5, layers: int = 2, dropout: float = 0.0) -> None:
        super().__init__()
        check_in_dims(in_dims, num_classes)
        self.in_dims = dict(in_dims)
        self.modalities = tuple(in_dims)
        self.num_classes = num_classes
        channels = sum(self.in_dims.values()) + len(self.modalities)
        self.net = nn.Sequential(Conv1dEncoder(channels, hidden, width, kernel, layers, dropout), nn.ReLU(),
                                 nn.Linear(hidden, num_classes))

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        """Logits [B, num_classes]."""
        n = batch_size(inputs, self.modalities)
        device, dtype = self._device(inputs), self._param_dtype()
        length = {m: _length(inputs[m]) for m in self.modalities if inputs.get(m) is not None}
        if len(set(length.values())) != 1:
            raise ValueError(f"data/conv1d needs sequences of one length; got {length or 'no modality'}")
        t = next(iter(length.values()))
        parts, flags = [], []
        for m in self.modalities:
            p = presence(inputs, m, n, device)
            if inputs.get(m) is None:
                parts.append(torch.zeros(n, t, self.in_dims[m], device=device, dtype=dtype))
            else:
                parts.append(_sequence(inputs, m, self.in_dims[m], p, device, dtype))
            flags.append(p.to(dtype).view(n, 1, 1).expand(n, t, 1))
        return self.net(torch.cat(parts + flags, dim=2))
