"""Connectors: put vision features ``[B, N, d_v]`` into a frozen causal LM, by the two architectures of MLLMs.

**Unified embedding-decoder** (``kind = "tokens"``): the connector maps the image features to
``M`` soft tokens ``[B, M, d_lm]`` that are spliced into the LM's ``inputs_embeds`` before the
text (:class:`align.mllm.MultimodalLM` does the splicing and puts label ``-100`` there).

=================  =========================================================================  ==========
name               architecture                                                               M
=================  =========================================================================  ==========
``linear``         ``nn.Linear(d_v, d_lm)`` per feature token (LLaVA-1)                        N
``mlp2x_gelu``     ``nn.Sequential(Linear(d_v, d_lm), GELU, Linear(d_lm, d_lm))`` (LLaVA-1.5)  N
``perceiver``      Flamingo's perceiver resampler: learned latents cross-attend to the         num_latents
                   features (and themselves), FFN, ``depth`` layers; then LN + projection
``qformer``        BLIP-2-style query transformer: learned queries, self-attention among       num_queries
                   them, cross-attention to the features, FFN; then LN + projection
=================  =========================================================================  ==========

The two projectors *are* ``nn.Linear`` / ``nn.Sequential``, so their state-dict keys are
LLaVA's (``weight, bias`` / ``0.weight, 0.bias, 2.weight, 2.bias``) and export is a renaming.

**Cross-modality attention** (``kind = "xattn"``): ``gated_xattn`` holds Flamingo's
``GATED XATTN-DENSE`` blocks (tanh-gated cross-attention to the image features, then a tanh-gated
FFN, both gates initialised to 0) that run before every ``every``-th frozen decoder layer.
:meth:`GatedXAttnConnector.attach` installs them with forward pre-hooks on the layers of
``model.model.layers`` (the hook replaces the layer's input hidden states by the block's
output), so the LM's module tree and state dict stay untouched and :meth:`detach` restores it
exactly; the image features are set per forward with ``with connector.conditioned(features):``.
With the gates at 0 the LM computes exactly what it computed before. It lives in :mod:`align.xattn`, which
imports this module (never the other way round); ``align.connectors.GatedXAttnConnector`` still names it.

Every connector **keeps its constructor arguments** (``connector.config``: name, dims, options; the
checkpoint format, :func:`connector_from_config` rebuilds it) and **owns its seeding**
(``connector.seed(image_to_lm, image_to_shared, features, **options)``, see :mod:`align.seeding`) and
its export name (``llava_type``: LLaVA's ``mm_projector_type``, ``None`` if LLaVA has no such
projector). Adding a connector = one class here (or in its own module) + ``@CONNECTORS.register``.
"""
from __future__ import annotations

import inspect
import logging
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from align.registry import Registry
from align.seeding import (MLP_MODES, RESAMPLER_BLOCKS, AffineMap, flat_tokens, gelu_shift, identity_attention,
                           map_r2, ridge, set_linear)

log = logging.getLogger(__name__)

CONNECTORS: Registry = Registry("connector", package="align", symbol="CONNECTORS")  # discovers align/*.py

class Connector:
    """Mixin of every connector (used with ``nn.Module`` subclasses).

    Attributes: ``vision_dim`` (d_v), ``lm_dim`` (d_lm), ``kind`` (``"tokens"`` or ``"xattn"``),
    ``name`` (the registry name), ``seeds_from_lm_map`` (whether :meth:`seed` uses ``image_to_lm``, whose
    output scale the bridge calibrates; the tag connectors seed from ``image_to_shared`` only).
    """

    kind: str = "tokens"
    seeds_from_lm_map: bool = True
    name: str = ""
    llava_type: str | None = None
    vision_dim: int
    lm_dim: int

    def __new__(cls, *args: Any, **kwargs: Any):
        self = super().__new__(cls)
        try:
            bound = inspect.signature(cls.__init__).bind(self, *args, **kwargs)
        except TypeError:  # copy/pickle call __new__ without arguments, then restore __dict__ (with _config)
            return self
        bound.apply_defaults()
        cfg = {k: v for k, v in bound.arguments.items() if k != "self"}
        object.__setattr__(self, "_config", {"name": cls.name, **cfg})  # before nn.Module.__init__
        return self

    @property
    def config(self) -> dict[str, Any]:
        """The constructor arguments (``name``, ``vision_dim``, ``lm_dim``, options): :func:`connector_from_config`."""
        return dict(self._config)

    def seed(self, image_to_lm: AffineMap, image_to_shared: AffineMap | None = None,
             features: Tensor | np.ndarray | None = None, **options: Any) -> dict[str, float]:
        """Initialise from the composed map image features → LLM embeddings (see :mod:`align.seeding`);
        returns diagnostics. ``features``: a sample of training features ``[B, N, d_v]``."""
        raise NotImplementedError(f"connector {self.name!r} has no seeding")

    def _check_seed_map(self, m: AffineMap) -> None:
        if m.in_dim != self.vision_dim or m.out_dim != self.lm_dim:
            raise ValueError(f"seed map is {m.in_dim} → {m.out_dim}, connector is {self.vision_dim} → {self.lm_dim}")

    def num_tokens(self, n_inputs: int) -> int:
        """How many soft tokens the connector emits for ``n_inputs`` feature tokens (0 for xattn)."""
        return n_inputs

    def check_features(self, x: Tensor) -> Tensor:
        """``x`` as ``[B, N, d_v]`` (a pooled ``[B, d_v]`` becomes one token); clear error otherwise."""
        if x.dim() == 2:
            x = x.unsqueeze(1)
        if x.dim() != 3 or x.shape[-1] != self.vision_dim:
            raise ValueError(f"{type(self).__name__} expects vision features [B, N, {self.vision_dim}] "
                             f"(or [B, {self.vision_dim}]), got {tuple(x.shape)}")
        return x

    def num_trainable_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)  # type: ignore[attr-defined]


def build_connector(name: str, vision_dim: int, lm_dim: int, **kwargs: Any) -> nn.Module:
    """Build a registered connector; keyword arguments the connector does not take are an error.

    ``num_lm_layers`` (the LM's depth) is needed by ``gated_xattn`` and ignored by the others.
    """
    factory = CONNECTORS.get(name)
    params = inspect.signature(factory).parameters
    if "num_lm_layers" not in params:
        kwargs.pop("num_lm_layers", None)
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        valid = [p for p in params if p not in ("self", "vision_dim", "lm_dim")]
        raise TypeError(f"connector {name!r} got unknown option(s) {', '.join(unknown)}; valid: {', '.join(valid)}")
    return factory(vision_dim=vision_dim, lm_dim=lm_dim, **kwargs)


# ------------------------------------------------------------------------------------------ projectors


@CONNECTORS.register("linear")
class LinearProjector(Connector, nn.Linear):
    """LLaVA-1's projector: one ``nn.Linear(d_v, d_lm)`` applied to every feature token: ``[B,N,d_v] → [B,N,d_lm]``."""

    name = "linear"
    llava_type = "linear"

    def __init__(self, vision_dim: int, lm_dim: int) -> None:
        nn.Linear.__init__(self, vision_dim, lm_dim)
        self.vision_dim, self.lm_dim = vision_dim, lm_dim

    def seed(self, image_to_lm: AffineMap, image_to_shared: AffineMap | None = None,
             features: Tensor | np.ndarray | None = None, **options: Any) -> dict[str, float]:
        """The map itself."""
        self._check_seed_map(image_to_lm)
        set_linear(self, image_to_lm)
        return {}

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.check_features(x))


@CONNECTORS.register("mlp2x_gelu")
class MLPProjector(Connector, nn.Sequential):
    """LLaVA-1.5's ``mlp2x_gelu``: ``Sequential(Linear(d_v, d_lm), GELU(), Linear(d_lm, d_lm))`` per token."""

    name = "mlp2x_gelu"
    llava_type = "mlp2x_gelu"

    def __init__(self, vision_dim: int, lm_dim: int) -> None:
        nn.Sequential.__init__(self, nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        self.vision_dim, self.lm_dim = vision_dim, lm_dim

    def seed(self, image_to_lm: AffineMap, image_to_shared: AffineMap | None = None,
             features: Tensor | np.ndarray | None = None, mlp_mode: str = "shift", **options: Any
             ) -> dict[str, float]:
        """``mlp_mode="shift"``: first layer = map + c (GELU's near-linear range), second = identity − c;
        ``"identity"``: first = map, second = identity (GELU clips the negative half)."""
        self._check_seed_map(image_to_lm)
        if mlp_mode not in MLP_MODES:
            raise ValueError(f"mlp_mode must be one of {MLP_MODES}, got {mlp_mode!r}")
        shift = 0.0
        if mlp_mode == "shift":
            if features is None:
                raise ValueError("mlp_mode='shift' needs a sample of training features to choose the shift")
            shift = gelu_shift(image_to_lm(flat_tokens(features)))
        set_linear(self[0], AffineMap(image_to_lm.weight, image_to_lm.bias + shift))
        set_linear(self[2], AffineMap(np.eye(self.lm_dim), np.full(self.lm_dim, -shift)))
        return {"mlp_shift": shift}

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.check_features(x))


# ------------------------------------------------------------------------------------------ resamplers


def _check_sizes(part: str, **sizes: Any) -> None:
    """``ValueError`` naming the first size option that is not a positive int (``depth=-1`` would quietly build no
    layers, ``heads=0`` divide by zero), so ``alignfuse run --dry-run`` reports it under the connector's key."""
    for key, value in sizes.items():
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
            raise ValueError(f"{part}: {key} must be a positive int, got {value!r}")


def _ffn(dim: int, mult: int) -> nn.Sequential:
    """Pre-norm FFN ``LN → Linear → GELU → Linear`` (index 3 is the output layer)."""
    return nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, mult * dim), nn.GELU(), nn.Linear(mult * dim, dim))


class _PerceiverLayer(nn.Module):
    """Latents attend to ``[features; latents]`` (Flamingo), then an FFN; both residual, pre-norm."""

    def __init__(self, dim: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_x = nn.LayerNorm(dim)
        self.norm_latents = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = _ffn(dim, ffn_mult)

    def forward(self, x: Tensor, latents: Tensor) -> Tensor:
        q = self.norm_latents(latents)
        kv = torch.cat([self.norm_x(x), q], dim=1)
        latents = latents + self.attn(q, kv, kv, need_weights=False)[0]
        return latents + self.ffn(latents)


class _Resampler(Connector, nn.Module):
    """Shared parts of the perceiver and the Q-Former: input projection (+ learned positions) of the
    features to width ``dim``, ``M`` learned queries, a stack of layers, final LN and output projection."""

    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int, dim: int, heads: int, max_inputs: int
                 ) -> None:
        nn.Module.__init__(self)
        if dim % heads:
            raise ValueError(f"{type(self).__name__}: heads={heads} must divide dim={dim}")
        if num_queries < 1:
            raise ValueError(f"{type(self).__name__}: needs at least one query/latent, got {num_queries}")
        self.vision_dim, self.lm_dim, self.dim = vision_dim, lm_dim, dim
        self.num_queries, self.max_inputs = num_queries, max_inputs
        self.in_proj = nn.Linear(vision_dim, dim)
        self.pos_emb = nn.Parameter(torch.randn(max_inputs, dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(num_queries, dim) * 0.02)
        self.norm = nn.LayerNorm(dim)
        self.out_proj = nn.Linear(dim, lm_dim)

    def num_tokens(self, n_inputs: int) -> int:
        return self.num_queries

    def embed_inputs(self, x: Tensor) -> Tensor:
        """Projected features plus learned positions ``[B, N, dim]``."""
        x = self.check_features(x)
        if x.shape[1] > self.max_inputs:
            raise ValueError(f"{type(self).__name__} was built for at most {self.max_inputs} feature tokens, "
                             f"got {x.shape[1]}")
        return self.in_proj(x) + self.pos_emb[: x.shape[1]]

    def hidden(self, x: Tensor) -> Tensor:
        """The normalised query states ``[B, M, dim]`` that ``out_proj`` maps to the LM width."""
        raise NotImplementedError

    def forward(self, x: Tensor) -> Tensor:
        return self.out_proj(self.hidden(x))

    def _pool_blocks(self) -> None:
        """Start every block as attention pooling: identity values, zero residual outputs."""
        raise NotImplementedError

    def seed(self, image_to_lm: AffineMap, image_to_shared: AffineMap | None = None,
             features: Tensor | np.ndarray | None = None, resampler_blocks: str = "pool", **options: Any
             ) -> dict[str, float]:
        """The first ``k`` rows of ``in_proj`` = image → shared map; blocks start as attention pooling
        (``resampler_blocks="pool"``) or stay random; ``out_proj`` fitted (ridge) from the normalised
        outputs to ``image_to_lm`` of the mean-pooled ``features``."""
        self._check_seed_map(image_to_lm)
        if image_to_shared is None or features is None:
            raise ValueError(f"seeding a {self.name} needs image_to_shared and a sample of features")
        k = image_to_shared.out_dim
        if k > self.dim:
            raise ValueError(f"shared space has {k} dims but the {self.name} is only {self.dim} wide")
        if resampler_blocks not in RESAMPLER_BLOCKS:
            raise ValueError(f"resampler_blocks must be one of {RESAMPLER_BLOCKS}, got {resampler_blocks!r}")
        set_linear(self.in_proj, image_to_shared, rows=slice(0, k))
        if resampler_blocks == "pool":
            with torch.no_grad():
                for layer in self.layers:
                    layer.ffn[3].weight.zero_()
                    layer.ffn[3].bias.zero_()
                self._pool_blocks()
        x = torch.as_tensor(np.asarray(features) if not isinstance(features, Tensor) else features).float()
        x = x[:512].to(self.in_proj.weight.device)
        with torch.no_grad():
            h = self.hidden(x).double().cpu().numpy()  # [B, M, dim]
        target = image_to_lm(x.double().mean(1).cpu().numpy())  # [B, d_lm]
        hx = h.reshape(-1, h.shape[-1])
        ty = np.repeat(target, h.shape[1], axis=0)
        out = ridge(hx, ty)
        set_linear(self.out_proj, out)
        return {"out_proj_r2": map_r2(out, hx, ty)}


@CONNECTORS.register("perceiver")
class PerceiverResampler(_Resampler):
    """Flamingo's perceiver resampler: ``[B, N, d_v] → [B, num_latents, d_lm]``.

    ``in_proj`` (d_v → dim) plus learned positions of the N feature tokens; ``num_latents``
    learned latents; ``depth`` layers of [latents attend to (features ‖ latents)] + FFN, pre-norm
    and residual; final LayerNorm and ``out_proj`` (dim → d_lm).
    """

    name = "perceiver"

    def __init__(self, vision_dim: int, lm_dim: int, num_latents: int = 8, dim: int = 256, depth: int = 2,
                 heads: int = 4, ffn_mult: int = 4, max_inputs: int = 256) -> None:
        _check_sizes(type(self).__name__, num_latents=num_latents, dim=dim, depth=depth, heads=heads,
                     ffn_mult=ffn_mult, max_inputs=max_inputs)
        super().__init__(vision_dim, lm_dim, num_latents, dim, heads, max_inputs)
        self.layers = nn.ModuleList(_PerceiverLayer(dim, heads, ffn_mult) for _ in range(depth))

    def _pool_blocks(self) -> None:
        for layer in self.layers:
            identity_attention(layer.attn)

    def hidden(self, x: Tensor) -> Tensor:
        x = self.embed_inputs(x)
        latents = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            latents = layer(x, latents)
        return self.norm(latents)


class _QFormerLayer(nn.Module):
    """Queries: self-attention, cross-attention to the features, FFN (pre-norm, residual)."""

    def __init__(self, dim: int, heads: int, ffn_mult: int) -> None:
        super().__init__()
        self.norm_self = nn.LayerNorm(dim)
        self.self_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm_q = nn.LayerNorm(dim)
        self.norm_x = nn.LayerNorm(dim)
        self.cross_attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ffn = _ffn(dim, ffn_mult)

    def forward(self, x: Tensor, q: Tensor) -> Tensor:
        h = self.norm_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        kv = self.norm_x(x)
        q = q + self.cross_attn(self.norm_q(q), kv, kv, need_weights=False)[0]
        return q + self.ffn(q)


@CONNECTORS.register("qformer")
class QFormer(_Resampler):
    """A BLIP-2-style query transformer: ``[B, N, d_v] → [B, num_queries, d_lm]``.

    ``num_queries`` learned queries; ``depth`` layers of self-attention among the queries,
    cross-attention to the projected features and an FFN (pre-norm, residual); final LayerNorm and
    ``out_proj`` (BLIP-2's ``language_projection``, dim → d_lm). Trained from scratch here (BLIP-2
    initialises its Q-Former from BERT and pre-trains it with ITC/ITM/ITG first).
    """

    name = "qformer"

    def __init__(self, vision_dim: int, lm_dim: int, num_queries: int = 8, dim: int = 256, depth: int = 2,
                 heads: int = 4, ffn_mult: int = 4, max_inputs: int = 256) -> None:
        _check_sizes(type(self).__name__, num_queries=num_queries, dim=dim, depth=depth, heads=heads,
                     ffn_mult=ffn_mult, max_inputs=max_inputs)
        super().__init__(vision_dim, lm_dim, num_queries, dim, heads, max_inputs)
        self.layers = nn.ModuleList(_QFormerLayer(dim, heads, ffn_mult) for _ in range(depth))

    def _pool_blocks(self) -> None:
        for layer in self.layers:
            identity_attention(layer.cross_attn)
            layer.self_attn.out_proj.weight.zero_()
            layer.self_attn.out_proj.bias.zero_()

    def hidden(self, x: Tensor) -> Tensor:
        x = self.embed_inputs(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(x, q)
        return self.norm(q)


def connector_config(connector: nn.Module) -> dict[str, Any]:
    """The constructor arguments a connector keeps (``connector.config``), for checkpoints."""
    return connector.config


def connector_from_config(cfg: dict[str, Any]) -> nn.Module:
    """A fresh connector from :func:`connector_config` output."""
    cfg = dict(cfg)
    return build_connector(cfg.pop("name"), **cfg)


def __getattr__(name: str) -> Any:
    """``from align.connectors import GatedXAttnConnector`` (or ``GatedXAttnBlock``): they live in
    :mod:`align.xattn`, which builds on this module (``Connector``, ``CONNECTORS``), so they are imported on
    first use. Registration needs no import here: the registry discovers ``align.xattn`` by its
    ``@CONNECTORS.register`` line."""
    if name in ("GatedXAttnBlock", "GatedXAttnConnector"):
        import align.xattn

        return getattr(align.xattn, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
