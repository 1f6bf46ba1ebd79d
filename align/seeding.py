"""Seed a connector from an aligned space instead of at random.

An aligner (CCA, CLIP heads) maps image features and text features into one shared space. The
LLM has its own text space: its input embeddings. One closed-form map from the shared space to
the LLM's embedding space, fitted on *text only*, composed with the aligner's image → shared
map, gives an image → LLM-embedding map before any multimodal LLM training::

    image x [d_v] ──aligner (affine)──► shared u [k] ──fit_map (affine, on text)──► LLM embedding [d_lm]

The text pairs for ``fit_map``: for each training caption (``target="captions"``) or each word
of the captions' vocabulary (``target="words"``), its shared-space code (the aligner's text side
applied to the frozen text encoder's features) and the mean of the LLM input-embedding rows of
its tokens (:func:`llm_text_embeddings`). ``method="lstsq"`` is ridge regression with the ridge
chosen by leave-one-out (``sklearn.linear_model.RidgeCV``); ``method="procrustes"`` is a scaled
orthogonal map (orthogonal Procrustes on the centred data, plus the least-squares global scale).

The map's output scale is a free choice (a word embedding and a mean of word embeddings differ in
norm): ``AffineMap.scaled``; the bridge runner picks it by step-0 caption NLL on training captions.

:func:`seed_connector` writes the composed map into a connector:

* ``linear``: the map itself.
* ``mlp2x_gelu``: ``mlp_mode="shift"`` puts the first layer's output in GELU's near-linear range
  (bias + c, with c chosen from the data so that ≥ 99.9 % of pre-activations exceed 4, where
  ``GELU(z) = z (1 - 3e-5)``), and the second layer is the identity with bias −c: the MLP computes
  the composed map up to ~1e-4 relative error. ``mlp_mode="identity"``: first layer = the map,
  second = identity (GELU then clips the negative half).
* ``perceiver`` / ``qformer``: the first ``k`` channels of ``in_proj`` get the aligner's image →
  shared map (the others keep their random init); every cross-attention passes values through
  (value and output projections = identity), the FFN output layers and the Q-Former's
  self-attention output start at zero (the blocks start as attention pooling of the projected
  features, as in ReZero/Fixup); ``out_proj`` is then fitted in closed form (ridge) from the
  resampler's normalised outputs to the composed map of the mean-pooled features, on ``features``.
* ``gated_xattn``: the gates stay at 0 (the LM is unchanged at step 0 either way); the value
  projection of every block is fitted (ridge) from the block's normalised features to the composed
  map on ``features``, and the output projection is the identity, so once a gate opens the block
  adds LLM-embedding-like vectors of what it attends to.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Any, Literal, Sequence

import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

Method = Literal["lstsq", "procrustes"]
METHODS = ("lstsq", "procrustes")
MLP_MODES = ("shift", "identity")
RESAMPLER_BLOCKS = ("pool", "random")
DEFAULT_ALPHAS = tuple(float(a) for a in np.logspace(-4, 4, 17))
_WORD_RE = re.compile(r"[a-z]+")
_GELU_LINEAR_FROM = 4.0  # GELU(z) = z * Phi(z); Phi(4) = 1 - 3.2e-5


@dataclass
class AffineMap:
    """``y = x @ weight + bias``: ``weight`` [d_in, d_out], ``bias`` [d_out] (float64 numpy)."""

    weight: np.ndarray
    bias: np.ndarray

    def __post_init__(self) -> None:
        self.weight = np.asarray(self.weight, dtype=np.float64)
        self.bias = np.asarray(self.bias, dtype=np.float64)
        if self.weight.ndim != 2 or self.bias.shape != (self.weight.shape[1],):
            raise ValueError(f"AffineMap needs weight [d_in, d_out] and bias [d_out], "
                             f"got {self.weight.shape} and {self.bias.shape}")

    @property
    def in_dim(self) -> int:
        return self.weight.shape[0]

    @property
    def out_dim(self) -> int:
        return self.weight.shape[1]

    def __call__(self, x: np.ndarray | Tensor) -> np.ndarray:
        """Apply to ``x`` [..., d_in] (numpy or tensor); float64 numpy [..., d_out]."""
        x = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        if x.shape[-1] != self.in_dim:
            raise ValueError(f"AffineMap expects inputs [..., {self.in_dim}], got {x.shape}")
        return x.astype(np.float64) @ self.weight + self.bias

    def then(self, other: "AffineMap") -> "AffineMap":
        """The composition ``other(self(x))``."""
        if other.in_dim != self.out_dim:
            raise ValueError(f"cannot compose a map to {self.out_dim} dims with one from {other.in_dim} dims")
        return AffineMap(self.weight @ other.weight, self.bias @ other.weight + other.bias)

    def scaled(self, s: float) -> "AffineMap":
        return AffineMap(self.weight * s, self.bias * s)


# ----------------------------------------------------------------------------------- aligner sides


def aligner_map(aligner: Any, modality: str) -> AffineMap:
    """The affine map from ``modality``'s features into an aligner's shared space.

    CCA: ``(x - mean) @ weights`` (times ``correlations_ ** encode_power``, as ``CCA.encode``). ``CLIPHeads`` with linear heads (and mean pooling for grids):
    the head's ``Linear``; its L2 normalisation is left out (a positive per-sample scale, which
    a connector's output scale absorbs). Aligners whose encoder is not affine raise ``ValueError``.
    """
    from align.cca import CCA

    if isinstance(aligner, CCA):
        aligner._check_fitted()
        if modality not in aligner.modalities:
            raise ValueError(f"CCA encodes {aligner.modalities}, not {modality!r}")
        first = modality == aligner.modalities[0]
        mean, w = (aligner.x_mean_, aligner.x_weights_) if first else (aligner.y_mean_, aligner.y_weights_)
        power = getattr(aligner, "encode_power", 0.0)  # CCA.encode scales variates by correlations ** power
        w = w * np.clip(aligner.correlations_, 0.0, None) ** power if power else w
        return AffineMap(w, -mean @ w)
    from align.clip import CLIPHeads

    if isinstance(aligner, CLIPHeads):
        if modality not in aligner.modalities:
            raise ValueError(f"CLIPHeads encodes {aligner.modalities}, not {modality!r}")
        head = aligner.image_head if modality == "image" else aligner.text_head
        if not isinstance(head, nn.Linear) or (modality == "image" and aligner.image_pool is not None):
            raise ValueError("seeding needs CLIPHeads(head='linear', pool='mean'): an MLP head or attention "
                             "pooling is not an affine map")
        return AffineMap(head.weight.detach().double().cpu().numpy().T, head.bias.detach().double().cpu().numpy())
    raise ValueError(f"no affine map for aligner {type(aligner).__name__}; seeding supports CCA and CLIPHeads(linear)")


# ------------------------------------------------------------------------------------- text targets


def caption_vocabulary(captions: Sequence[str], min_count: int = 1) -> list[str]:
    """Sorted lower-case words (letters only) of ``captions`` occurring at least ``min_count`` times."""
    counts: dict[str, int] = {}
    for c in captions:
        for w in _WORD_RE.findall(c.lower()):
            counts[w] = counts.get(w, 0) + 1
    return sorted(w for w, n in counts.items() if n >= min_count)


def bag_of_words(texts: Sequence[str], vocabulary: Sequence[str]) -> np.ndarray:
    """``[n, V]`` float32 indicator of which ``vocabulary`` words (lower-case, letters only) each text contains.

    As a text view for a seeding aligner it keeps each word on its own axis, so the text side of the
    shared → LLM map is exact for single words (a one-hot row), where a sentence encoder blends them."""
    index = {w: i for i, w in enumerate(vocabulary)}
    out = np.zeros((len(texts), len(index)), dtype=np.float32)
    for row, text in enumerate(texts):
        cols = [index[w] for w in _WORD_RE.findall(text.lower()) if w in index]
        out[row, cols] = 1.0
    return out


@torch.no_grad()
def llm_text_embeddings(llm: nn.Module, tokenizer: Any, texts: Sequence[str], leading_space: bool = True
                        ) -> np.ndarray:
    """Mean of the LLM's input-embedding rows over each text's tokens: ``[n, d_lm]`` float64.

    ``leading_space`` tokenises ``" " + text``, as a word or caption reads inside a sentence.
    """
    weight = llm.get_input_embeddings().weight
    rows = tokenizer([(" " + t) if leading_space else t for t in texts], add_special_tokens=False)["input_ids"]
    out = np.empty((len(rows), weight.shape[1]), dtype=np.float64)
    for i, ids in enumerate(rows):
        if not ids:
            raise ValueError(f"text {texts[i]!r} has no tokens")
        out[i] = weight[torch.as_tensor(ids, device=weight.device)].double().mean(0).cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------ fitting


def fit_map(src: np.ndarray, dst: np.ndarray, method: Method = "lstsq",
            alphas: Sequence[float] = DEFAULT_ALPHAS) -> AffineMap:
    """Closed-form affine map ``src [n, k] → dst [n, d]``.

    ``"lstsq"``: ridge regression with intercept, ridge chosen from ``alphas`` by efficient
    leave-one-out (``RidgeCV``). ``"procrustes"``: ``dst ≈ s · src @ R + b`` with ``R`` [k, d]
    having orthonormal rows (``k <= d``), from the SVD of the centred cross-covariance, and the
    least-squares scale ``s = trace(Σ) / ||src_c||²``.
    """
    src = np.asarray(src, dtype=np.float64)
    dst = np.asarray(dst, dtype=np.float64)
    if src.ndim != 2 or dst.ndim != 2 or len(src) != len(dst):
        raise ValueError(f"fit_map needs src [n, k] and dst [n, d] with equal n, got {src.shape} and {dst.shape}")
    if len(src) < 2:
        raise ValueError(f"fit_map needs at least 2 pairs, got {len(src)}")
    if method == "lstsq":
        from sklearn.linear_model import RidgeCV

        ridge = RidgeCV(alphas=list(alphas), fit_intercept=True).fit(src, dst)
        log.debug("fit_map lstsq: ridge alpha %.3g", ridge.alpha_)
        return AffineMap(ridge.coef_.T, ridge.intercept_)
    if method == "procrustes":
        k, d = src.shape[1], dst.shape[1]
        if k > d:
            raise ValueError(f"procrustes maps k={k} dims into d={d} >= k dims; got k > d")
        mx, my = src.mean(0), dst.mean(0)
        xc, yc = src - mx, dst - my
        u, s, vt = np.linalg.svd(xc.T @ yc, full_matrices=False)  # [k, k], [k], [k, d]
        rot = u @ vt
        scale = float(s.sum() / max((xc**2).sum(), np.finfo(np.float64).tiny))
        w = scale * rot
        return AffineMap(w, my - mx @ w)
    raise ValueError(f"method must be one of {METHODS}, got {method!r}")


def map_r2(m: AffineMap, src: np.ndarray, dst: np.ndarray) -> float:
    """Coefficient of determination of ``m`` on (held-out) pairs: 1 − SSE / total variance of ``dst``."""
    dst = np.asarray(dst, dtype=np.float64)
    err = ((m(src) - dst) ** 2).sum()
    tot = ((dst - dst.mean(0)) ** 2).sum()
    return float(1.0 - err / max(tot, np.finfo(np.float64).tiny))


def fit_text_to_lm(aligner: Any, text_features: np.ndarray, lm_targets: np.ndarray, method: Method = "lstsq",
                   text_modality: str | None = None) -> AffineMap:
    """Shared space → LLM embeddings, fitted on text pairs: ``aligner``'s text code of ``text_features``
    [n, d_t] against ``lm_targets`` [n, d_lm] (e.g. :func:`llm_text_embeddings` of the same texts)."""
    modality = text_modality or aligner.modalities[1]
    shared = aligner_map(aligner, modality)(text_features)
    return fit_map(shared, lm_targets, method)


def image_to_lm_map(aligner: Any, shared_to_lm: AffineMap, image_modality: str | None = None) -> AffineMap:
    """The composition image features → shared space → LLM embeddings."""
    return aligner_map(aligner, image_modality or aligner.modalities[0]).then(shared_to_lm)


# ------------------------------------------------------------------------------------------ seeding


def set_linear(layer: nn.Linear, m: AffineMap, rows: slice | None = None) -> None:
    """Write ``m`` (weight [in, out]) into ``layer`` (weight [out, in]); ``rows``: only those outputs."""
    w = torch.as_tensor(m.weight.T, dtype=layer.weight.dtype, device=layer.weight.device)
    b = torch.as_tensor(m.bias, dtype=layer.weight.dtype, device=layer.weight.device)
    with torch.no_grad():
        if rows is None:
            if tuple(layer.weight.shape) != tuple(w.shape):
                raise ValueError(f"map is {m.in_dim} → {m.out_dim}, layer is {layer.in_features} → {layer.out_features}")
            layer.weight.copy_(w)
            if layer.bias is not None:
                layer.bias.copy_(b)
        else:
            layer.weight[rows].copy_(w)
            layer.bias[rows].copy_(b)


def ridge(x: np.ndarray, y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS) -> AffineMap:
    """:func:`fit_map` with ``method="lstsq"``."""
    return fit_map(x, y, "lstsq", alphas)


def flat_tokens(features: Tensor | np.ndarray, max_rows: int = 8192, seed: int = 0) -> np.ndarray:
    """Feature tokens ``[B, N, d]`` → a row sample ``[<=max_rows, d]`` float64."""
    x = features.detach().cpu().numpy() if isinstance(features, Tensor) else np.asarray(features)
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    if len(x) > max_rows:
        x = x[np.random.default_rng(seed).choice(len(x), max_rows, replace=False)]
    return x


def gelu_shift(pre_activations: np.ndarray) -> float:
    """The shift ``c >= 0`` that puts >= 99.9 % of ``pre_activations + c`` in GELU's near-linear range."""
    return float(max(0.0, _GELU_LINEAR_FROM - np.quantile(pre_activations, 0.001)))


def identity_attention(attn: nn.MultiheadAttention, values: bool = True) -> None:
    """Value and output projections of a same-width attention = identity (biases 0)."""
    d = attn.embed_dim
    with torch.no_grad():
        if values:
            attn.in_proj_weight[2 * d:].copy_(torch.eye(d))
            attn.in_proj_bias[2 * d:].zero_()
        attn.out_proj.weight.copy_(torch.eye(d))
        attn.out_proj.bias.zero_()


def seed_connector(connector: nn.Module, image_to_lm: AffineMap, image_to_shared: AffineMap | None = None,
                   features: Tensor | np.ndarray | None = None, mlp_mode: str = "shift",
                   resampler_blocks: str = "pool") -> dict[str, float]:
    """Initialise ``connector`` from the composed map ``image_to_lm`` (d_v → d_lm): ``connector.seed(...)``.

    Each connector owns its recipe (module doc). ``image_to_shared`` (d_v → k) is needed by the
    perceiver and the Q-Former; ``features`` (a sample of training features ``[B, N, d_v]``) by
    ``mlp2x_gelu`` in shift mode, the resamplers and ``gated_xattn``; ``mlp_mode`` and
    ``resampler_blocks`` are options of the connectors that take them. Returns diagnostics.
    """
    if not hasattr(connector, "seed"):
        raise ValueError(f"seed_connector does not know {type(connector).__name__} (no seed method)")
    return connector.seed(image_to_lm, image_to_shared=image_to_shared, features=features, mlp_mode=mlp_mode,
                          resampler_blocks=resampler_blocks)
