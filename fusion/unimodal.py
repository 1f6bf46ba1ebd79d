"""The unimodal baseline of the fusion comparison: the feature-level encoder and head on one modality."""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fusion._common import FusionModule, batch_size, mlp, presence, zero_missing_rows


class UnimodalClassifier(FusionModule):
    """``MLP(in_dim → hidden → embed_dim)`` → ``MLP(embed_dim → hidden → num_classes)`` on ``inputs[modality]``.

    Input [B, in_dim] (or tokens [B, L, in_dim], averaged). Missing (key absent or ``"<modality>_mask"`` False):
    the input row is zero (the training mean of standardised features), as for the data-level strategies. No
    fusion, so ``fusion_parameters()`` is empty. Report name ``unimodal/<modality>``.
    """

    level = "unimodal"

    def __init__(self, modality: str, in_dim: int, num_classes: int, embed_dim: int = 64, hidden: int = 128,
                 dropout: float = 0.0) -> None:
        super().__init__()
        if in_dim < 1 or num_classes < 2:
            raise ValueError(f"in_dim must be >= 1 and num_classes >= 2; got {in_dim}, {num_classes}")
        self.modalities = (modality,)
        self.operator = modality
        self.in_dim, self.num_classes = in_dim, num_classes
        self.encoders = nn.ModuleDict({modality: mlp(in_dim, hidden, embed_dim, dropout)})
        self.head = mlp(embed_dim, hidden, num_classes, dropout)

    @classmethod
    def from_inputs(cls, in_dims: Mapping[str, int], num_classes: int, **kwargs: Any) -> "UnimodalClassifier":
        """Built from ``in_dims`` with exactly one modality."""
        if len(in_dims) != 1:
            raise ValueError(f"a unimodal baseline takes one modality; in_dims has {dict(in_dims)}")
        (modality, in_dim), = in_dims.items()
        return cls(modality, int(in_dim), num_classes, **kwargs)

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        """Logits [B, num_classes]."""
        (m,) = self.modalities
        n = batch_size(inputs, self.modalities)
        device, dtype = self._device(inputs), self._param_dtype()
        if inputs.get(m) is None:
            x = torch.zeros(n, self.in_dim, device=device, dtype=dtype)
        else:
            x = torch.as_tensor(inputs[m], device=device).to(dtype)
            if x.dim() == 3:
                x = x.mean(dim=1)
            if x.dim() != 2 or x.shape[1] != self.in_dim:
                raise ValueError(f"inputs[{m!r}] has shape {tuple(x.shape)}; expected [B, {self.in_dim}]")
            x = zero_missing_rows(x, presence(inputs, m, n, device))
        return self.head(self.encoders[m](x))

    def fusion_parameters(self) -> list[nn.Parameter]:
        return []
