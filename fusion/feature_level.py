"""Feature-level (intermediate) fusion: per-modality encoders, then one operator on their outputs.

Every strategy here is an :class:`~fusion._common.FusionModule` built from
``in_dims: dict[str, int]`` (modality → input feature size) and ``num_classes``:

* each modality ``m`` has an encoder ``MLP(in_dims[m] → hidden → embed_dim)`` (``self.encoders``);
* the operator fuses the ``[B, embed_dim]`` codes and a head ``MLP(· → hidden → num_classes)``
  (or the operator's own output layer) gives the logits.

Inputs: ``inputs[m]`` is ``[B, in_dims[m]]``, or a token sequence ``[B, L_m, in_dims[m]]``
(e.g. MobileNetV2 grid features). :class:`CrossAttentionFusion` keeps the tokens; the other
operators average them first. Missing modalities follow :mod:`fusion._common` (key absent, or
``inputs["<m>_mask"]`` bool [B]); each operator's handling is in its docstring.
``fusion_parameters()`` is everything but ``self.encoders``: the operator and the head.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from fusion._common import FusionModule, batch_size, check_in_dims, mlp, presence, zero_missing_rows
from fusion.base import FUSIONS

log = logging.getLogger(__name__)

__all__ = [
    "ConcatFusion",
    "CrossAttentionFusion",
    "FeatureFusion",
    "GatedFusion",
    "LowRankFusion",
    "SumFusion",
    "TensorFusion",
]


class FeatureFusion(FusionModule):
    """Base of the feature-level strategies: encoders, masking, and ``fuse`` → head.

    Subclasses implement ``fuse(z [B, M, D], present [B, M] bool) -> [B, F]``, where ``z`` holds
    the encoder outputs in ``self.modalities`` order with absent entries set to zero, and define
    ``self.head`` mapping ``[B, F]`` to logits.
    """

    level = "feature"

    def __init__(
        self,
        in_dims: Mapping[str, int],
        num_classes: int,
        embed_dim: int = 32,
        hidden: int = 64,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        check_in_dims(in_dims, num_classes)
        self.in_dims = dict(in_dims)
        self.modalities = tuple(in_dims)
        self.num_classes = num_classes
        self.embed_dim = embed_dim
        self.hidden = hidden
        self.dropout = dropout
        self.encoders = nn.ModuleDict({m: mlp(d, hidden, embed_dim, dropout) for m, d in self.in_dims.items()})

    def _modality_input(self, inputs: Mapping[str, Any], m: str, present: Tensor, device, dtype) -> Tensor:
        x = torch.as_tensor(inputs[m], device=device).to(dtype)
        if x.dim() not in (2, 3) or x.shape[-1] != self.in_dims[m]:
            raise ValueError(
                f"inputs[{m!r}] has shape {tuple(x.shape)}; "
                f"expected [B, {self.in_dims[m]}] or [B, L, {self.in_dims[m]}]"
            )
        return zero_missing_rows(x, present)

    def _encode_modality(self, inputs: Mapping[str, Any], m: str, present: Tensor, device, dtype) -> Tensor:
        """Modality ``m``'s code [B, embed_dim] (before zeroing absent rows)."""
        x = self._modality_input(inputs, m, present, device, dtype)
        if x.dim() == 3:  # token sequence: average the tokens (CrossAttentionFusion keeps them)
            x = x.mean(dim=1)
        return self.encoders[m](x)

    def encode(self, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Encoder outputs ``z`` [B, M, embed_dim] (zero where absent) and ``present`` [B, M] bool."""
        n = batch_size(inputs, self.modalities)
        device, dtype = self._device(inputs), self._param_dtype()
        zs, masks = [], []
        for m in self.modalities:
            p = presence(inputs, m, n, device)
            if inputs.get(m) is None:
                z = torch.zeros(n, self.embed_dim, device=device, dtype=dtype)
            else:
                z = zero_missing_rows(self._encode_modality(inputs, m, p, device, dtype), p)
            zs.append(z)
            masks.append(p)
        return torch.stack(zs, dim=1), torch.stack(masks, dim=1)

    def fuse(self, z: Tensor, present: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        """Logits [B, num_classes] from a dict of per-modality features."""
        z, present = self.encode(inputs)
        return self.head(self.fuse(z, present))


@FUSIONS.register("feature/concat")
class ConcatFusion(FeatureFusion):
    """Concatenate the modality codes → MLP head. Missing: a learned per-modality "missing" code
    (initialised to zero) replaces the absent code."""

    operator = "concat"

    def __init__(
        self, in_dims: Mapping[str, int], num_classes: int, embed_dim: int = 32, hidden: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dims, num_classes, embed_dim, hidden, dropout)
        self.missing = nn.Parameter(torch.zeros(len(self.modalities), embed_dim))
        self.head = mlp(len(self.modalities) * embed_dim, hidden, num_classes, dropout)

    def fuse(self, z: Tensor, present: Tensor) -> Tensor:
        z = torch.where(present.unsqueeze(-1), z, self.missing.to(z.dtype))
        return z.flatten(1)


@FUSIONS.register("feature/sum")
class SumFusion(FeatureFusion):
    """Sum of the modality codes → MLP head. Missing: the absent code contributes zero."""

    operator = "sum"

    def __init__(
        self, in_dims: Mapping[str, int], num_classes: int, embed_dim: int = 32, hidden: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dims, num_classes, embed_dim, hidden, dropout)
        self.head = mlp(embed_dim, hidden, num_classes, dropout)

    def fuse(self, z: Tensor, present: Tensor) -> Tensor:
        return z.sum(dim=1)


@FUSIONS.register("feature/gated")
class GatedFusion(FeatureFusion):
    """Per-sample modality weights ``a = softmax(gate([z_1; …; z_M]))`` over the *present*
    modalities, fused code ``Σ_m a_m z_m`` → MLP head. Missing: weights renormalise over the
    present modalities (all zero when none is present)."""

    operator = "gated"

    def __init__(
        self, in_dims: Mapping[str, int], num_classes: int, embed_dim: int = 32, hidden: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dims, num_classes, embed_dim, hidden, dropout)
        m = len(self.modalities)
        self.gate = nn.Sequential(nn.Linear(m * embed_dim, hidden), nn.Tanh(), nn.Linear(hidden, m))
        self.head = mlp(embed_dim, hidden, num_classes, dropout)

    def weights(self, z: Tensor, present: Tensor) -> Tensor:
        """Modality weights [B, M]: rows sum to 1 over present modalities (0 if none present)."""
        scores = self.gate(z.flatten(1)).masked_fill(~present, torch.finfo(z.dtype).min)
        return scores.softmax(dim=-1) * present  # all-absent rows: uniform × 0 = 0, no NaN

    @torch.no_grad()
    def gate_weights(self, inputs: Mapping[str, Any]) -> Tensor:
        """Per-sample modality weights [B, M] (``self.modalities`` order), for inspection."""
        return self.weights(*self.encode(inputs))

    def fuse(self, z: Tensor, present: Tensor) -> Tensor:
        return (self.weights(z, present).unsqueeze(-1) * z).sum(dim=1)


@FUSIONS.register("feature/tfn")
class TensorFusion(FeatureFusion):
    """Tensor Fusion Network (Zadeh et al., 2017): the outer product of the ``[z_m; 1]`` vectors,
    flattened to ``(embed_dim + 1) ** M`` features → MLP head. The appended 1 keeps every
    lower-order (unimodal, bimodal, …) interaction. Missing: ``z_m = 0``, so only the constant-1
    path of that modality remains. Size grows as ``(embed_dim+1)**M``: keep ``embed_dim`` small.
    """

    operator = "tfn"

    def __init__(
        self, in_dims: Mapping[str, int], num_classes: int, embed_dim: int = 8, hidden: int = 64, dropout: float = 0.0
    ) -> None:
        super().__init__(in_dims, num_classes, embed_dim, hidden, dropout)
        self.product_dim = (embed_dim + 1) ** len(self.modalities)
        if self.product_dim > 2**20:
            log.warning("TFN product has %d features ((%d+1)^%d); consider a smaller embed_dim",
                        self.product_dim, embed_dim, len(self.modalities))
        self.head = mlp(self.product_dim, hidden, num_classes, dropout)

    def fuse(self, z: Tensor, present: Tensor) -> Tensor:
        ones = z.new_ones(z.shape[0], z.shape[1], 1)
        z1 = torch.cat([z, ones], dim=-1)  # [B, M, D+1]
        t = z1[:, 0]
        for i in range(1, z1.shape[1]):
            t = (t.unsqueeze(-1) * z1[:, i].unsqueeze(1)).flatten(1)
        return t


@FUSIONS.register("feature/lmf")
class LowRankFusion(FeatureFusion):
    """Low-rank Multimodal Fusion (Liu et al., 2018): TFN's first head layer
    ``W ∈ R^{(D+1)×…×(D+1)×hidden}`` factorised as ``Σ_r ∘_m W_m^{(r)}``, so
    ``h = Σ_r λ_r ∏_m ([z_m; 1] W_m^{(r)}) + b`` without building the product tensor, then
    ``ReLU → Dropout → Linear(hidden, num_classes)``. Missing: the constant-1 path, as in TFN.

    Scale: a product of M projections shrinks or explodes geometrically with M if each projection
    is a zero-mean random variable (with the released code's Xavier init the fused activation had std
    ~1e-9 at init with 6 modalities, and training could stay at chance). So each code ``z_m`` is
    layer-normalised (no learned affine; ``||z_m||² = D``, absent codes stay 0) and every factor
    starts as "1 + noise": its constant-row weights are 1 and its other weights are
    ``N(0, s²/D)`` with ``(1 + s²)^M = 1 + rank``. Each projection is then ``1 + δ`` with
    ``Var δ = s²``, the ``rank`` products are independent with mean 1 and variance ``rank``, and
    with ``λ_r = 1/rank`` and ``b = -1`` the fused activation ``h`` starts with mean 0 and variance 1
    for any number of modalities and any rank, and the gradient reaching each factor is O(1).

    Parameters: ``factors`` (``nn.ParameterList``, one ``[rank, D+1, hidden]`` per modality),
    ``rank_weights`` [rank], ``bias`` [hidden], and the output layer.
    """

    operator = "lmf"

    def __init__(
        self,
        in_dims: Mapping[str, int],
        num_classes: int,
        embed_dim: int = 32,
        hidden: int = 64,
        dropout: float = 0.0,
        rank: int = 4,
    ) -> None:
        super().__init__(in_dims, num_classes, embed_dim, hidden, dropout)
        if rank < 1:
            raise ValueError(f"rank must be >= 1, got {rank}")
        self.rank = rank
        self.factors = nn.ParameterList(
            [nn.Parameter(torch.empty(rank, embed_dim + 1, hidden)) for _ in self.modalities]
        )
        self.rank_weights = nn.Parameter(torch.full((rank,), 1.0 / rank))
        self.bias = nn.Parameter(torch.full((hidden,), -1.0))
        self.head = nn.Sequential(nn.ReLU(), nn.Dropout(dropout), nn.Linear(hidden, num_classes))
        # (1 + s²)^M = 1 + rank: each product has variance `rank`, so mean over ranks has variance 1
        s2 = (1.0 + rank) ** (1.0 / len(self.modalities)) - 1.0
        with torch.no_grad():
            for f in self.factors:
                nn.init.normal_(f[:, :embed_dim], std=math.sqrt(s2 / embed_dim))
                f[:, embed_dim].fill_(1.0)

    def encode(self, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Layer-normalised codes ``z`` [B, M, D] (zero where absent) and ``present`` [B, M]."""
        z, present = super().encode(inputs)
        z = nn.functional.layer_norm(z, (self.embed_dim,))  # an absent (all-zero) code stays zero
        return torch.where(present.unsqueeze(-1), z, torch.zeros((), dtype=z.dtype, device=z.device)), present

    def fuse(self, z: Tensor, present: Tensor) -> Tensor:
        z1 = torch.cat([z, z.new_ones(z.shape[0], z.shape[1], 1)], dim=-1)  # [B, M, D+1]
        prod = None
        for i, factor in enumerate(self.factors):
            proj = torch.einsum("bd,rdh->brh", z1[:, i], factor)  # [B, rank, hidden]
            prod = proj if prod is None else prod * proj
        return torch.einsum("brh,r->bh", prod, self.rank_weights) + self.bias


@FUSIONS.register("feature/cross_attention")
class CrossAttentionFusion(FeatureFusion):
    """Transformer layers over all modalities' tokens, so every token attends across modalities.

    Each modality gives ``L_m`` tokens (a ``[B, d_m]`` vector is one token, ``[B, L_m, d_m]`` a
    sequence of at most ``max_tokens``); a token is ``encoder_m(x) + modality_embedding[m] +
    position_embedding[l]``. A learned ``[CLS]`` token is prepended; its output → LayerNorm →
    MLP head. Missing: the modality's tokens are excluded through ``src_key_padding_mask``
    (``[CLS]`` is never masked, so a sample with every modality missing still gets finite logits).
    """

    operator = "cross_attention"

    def __init__(
        self,
        in_dims: Mapping[str, int],
        num_classes: int,
        embed_dim: int = 32,
        hidden: int = 64,
        dropout: float = 0.0,
        num_heads: int = 4,
        num_layers: int = 2,
        max_tokens: int = 64,
    ) -> None:
        super().__init__(in_dims, num_classes, embed_dim, hidden, dropout)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads ({num_heads})")
        self.num_heads, self.num_layers, self.max_tokens = num_heads, num_layers, max_tokens
        self.cls = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.modality_embedding = nn.Parameter(torch.zeros(len(self.modalities), embed_dim))
        self.position_embedding = nn.Parameter(torch.zeros(max_tokens, embed_dim))
        for p in (self.cls, self.modality_embedding, self.position_embedding):
            nn.init.trunc_normal_(p, std=0.02)
        layer = nn.TransformerEncoderLayer(
            embed_dim, num_heads, dim_feedforward=hidden, dropout=dropout, batch_first=True, norm_first=True
        )
        self.transformer = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(embed_dim)
        self.head = mlp(embed_dim, hidden, num_classes, dropout)

    def tokens(self, inputs: Mapping[str, Any]) -> tuple[Tensor, Tensor]:
        """Token sequence [B, 1 + Σ L_m, D] (``[CLS]`` first) and its padding mask [B, 1 + Σ L_m]
        (``True`` = ignore)."""
        n = batch_size(inputs, self.modalities)
        device, dtype = self._device(inputs), self._param_dtype()
        toks = [self.cls.to(dtype).expand(n, -1, -1)]
        pads = [torch.zeros(n, 1, dtype=torch.bool, device=device)]
        for i, m in enumerate(self.modalities):
            if inputs.get(m) is None:  # missing for the whole batch: no tokens at all
                continue
            p = presence(inputs, m, n, device)
            x = self._modality_input(inputs, m, p, device, dtype)
            if x.dim() == 2:
                x = x.unsqueeze(1)
            length = x.shape[1]
            if length > self.max_tokens:
                raise ValueError(
                    f"inputs[{m!r}] has {length} tokens; this model takes at most max_tokens={self.max_tokens}"
                )
            toks.append(self.encoders[m](x) + self.modality_embedding[i] + self.position_embedding[:length])
            pads.append((~p).unsqueeze(1).expand(n, length))
        return torch.cat(toks, dim=1), torch.cat(pads, dim=1)

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        x, pad = self.tokens(inputs)
        out = self.transformer(x, src_key_padding_mask=pad)
        return self.head(self.norm(out[:, 0]))
