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
With the gates at 0 the LM computes exactly what it computed before.
"""
from __future__ import annotations

import contextlib
import inspect
import logging
from typing import Any, Iterator

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from align.registry import Registry

log = logging.getLogger(__name__)

CONNECTORS: Registry = Registry("connector")


class Connector:
    """Mixin of every connector (used with ``nn.Module`` subclasses).

    Attributes: ``vision_dim`` (d_v), ``lm_dim`` (d_lm), ``kind`` (``"tokens"`` or ``"xattn"``),
    ``name`` (the registry name).
    """

    kind: str = "tokens"
    name: str = ""
    vision_dim: int
    lm_dim: int

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

    def __init__(self, vision_dim: int, lm_dim: int) -> None:
        nn.Linear.__init__(self, vision_dim, lm_dim)
        self.vision_dim, self.lm_dim = vision_dim, lm_dim

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.check_features(x))


@CONNECTORS.register("mlp2x_gelu")
class MLPProjector(Connector, nn.Sequential):
    """LLaVA-1.5's ``mlp2x_gelu``: ``Sequential(Linear(d_v, d_lm), GELU(), Linear(d_lm, d_lm))`` per token."""

    name = "mlp2x_gelu"

    def __init__(self, vision_dim: int, lm_dim: int) -> None:
        nn.Sequential.__init__(self, nn.Linear(vision_dim, lm_dim), nn.GELU(), nn.Linear(lm_dim, lm_dim))
        self.vision_dim, self.lm_dim = vision_dim, lm_dim

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(self.check_features(x))


# ------------------------------------------------------------------------------------------ resamplers


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
        super().__init__(vision_dim, lm_dim, num_latents, dim, heads, max_inputs)
        self.layers = nn.ModuleList(_PerceiverLayer(dim, heads, ffn_mult) for _ in range(depth))

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
        super().__init__(vision_dim, lm_dim, num_queries, dim, heads, max_inputs)
        self.layers = nn.ModuleList(_QFormerLayer(dim, heads, ffn_mult) for _ in range(depth))

    def hidden(self, x: Tensor) -> Tensor:
        x = self.embed_inputs(x)
        q = self.queries.unsqueeze(0).expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(x, q)
        return self.norm(q)


# ------------------------------------------------------------------------------- gated cross-attention


class GatedXAttnBlock(nn.Module):
    """Flamingo's ``GATED XATTN-DENSE``: ``y += tanh(a_attn) * XAttn(LN(y), LN(x)); y += tanh(a_ffn) * FFN(LN(y))``.

    ``y`` [B, L, d_lm] are the LM's hidden states, ``x`` [B, N, d_v] the image features (keys and
    values are projected from d_v directly). Both gates start at 0: the block is the identity.
    """

    def __init__(self, lm_dim: int, vision_dim: int, heads: int = 8, ffn_mult: int = 4) -> None:
        super().__init__()
        if lm_dim % heads:
            raise ValueError(f"GatedXAttnBlock: heads={heads} must divide lm_dim={lm_dim}")
        self.norm_x = nn.LayerNorm(vision_dim)
        self.norm_y = nn.LayerNorm(lm_dim)
        self.attn = nn.MultiheadAttention(lm_dim, heads, kdim=vision_dim, vdim=vision_dim, batch_first=True)
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ffn = _ffn(lm_dim, ffn_mult)
        self.ffn_gate = nn.Parameter(torch.zeros(1))

    def forward(self, y: Tensor, x: Tensor) -> Tensor:
        kv = self.norm_x(x.to(y.dtype))
        y = y + torch.tanh(self.attn_gate) * self.attn(self.norm_y(y), kv, kv, need_weights=False)[0]
        return y + torch.tanh(self.ffn_gate) * self.ffn(y)


@CONNECTORS.register("gated_xattn")
class GatedXAttnConnector(Connector, nn.Module):
    """Gated cross-attention blocks inserted before every ``every``-th decoder layer of a frozen LM.

    Args:
        vision_dim, lm_dim: d_v and the LM width.
        num_lm_layers: depth of the LM (blocks go before layers ``0, every, 2*every, ...``).
        every: insertion period (Flamingo-3B: every layer; 9B: every 4th; 80B: every 7th).
        heads, ffn_mult: of each block.

    Use: ``connector.attach(llm)`` once; then ``with connector.conditioned(features): llm(...)``.
    Outside ``conditioned`` (or with ``None`` features) the hooks do nothing.
    """

    kind = "xattn"
    name = "gated_xattn"

    def __init__(self, vision_dim: int, lm_dim: int, num_lm_layers: int, every: int = 4, heads: int = 8,
                 ffn_mult: int = 4) -> None:
        nn.Module.__init__(self)
        if every < 1 or num_lm_layers < 1:
            raise ValueError(f"gated_xattn needs every >= 1 and num_lm_layers >= 1, got {every}, {num_lm_layers}")
        self.vision_dim, self.lm_dim = vision_dim, lm_dim
        self.num_lm_layers, self.every = num_lm_layers, every
        self.layer_ids = list(range(0, num_lm_layers, every))
        self.blocks = nn.ModuleList(GatedXAttnBlock(lm_dim, vision_dim, heads, ffn_mult) for _ in self.layer_ids)
        self._features: Tensor | None = None
        self._handles: list[RemovableHandle] = []

    def num_tokens(self, n_inputs: int) -> int:
        return 0

    def forward(self, x: Tensor) -> Tensor:
        """Validated features ``[B, N, d_v]`` (what the blocks attend to); the LM consumes them via the hooks."""
        return self.check_features(x)

    @property
    def attached(self) -> bool:
        return bool(self._handles)

    def attach(self, llm: nn.Module) -> "GatedXAttnConnector":
        """Install the blocks in front of the LM's decoder layers (forward pre-hooks)."""
        from align.llm import decoder_layers

        if self._handles:
            raise RuntimeError("this gated_xattn connector is already attached; call detach() first")
        layers = decoder_layers(llm)
        if len(layers) != self.num_lm_layers:
            raise ValueError(f"gated_xattn was built for {self.num_lm_layers} LM layers, the LM has {len(layers)}")
        for block, i in zip(self.blocks, self.layer_ids):
            self._handles.append(layers[i].register_forward_pre_hook(self._make_hook(block), with_kwargs=True))
        return self

    def detach(self) -> None:
        """Remove the hooks: the LM is exactly as before :meth:`attach`."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def _make_hook(self, block: GatedXAttnBlock):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
            x = self._features
            if x is None:
                return None
            if args:
                return (block(args[0], x), *args[1:]), kwargs
            return args, {**kwargs, "hidden_states": block(kwargs["hidden_states"], x)}

        return hook

    @contextlib.contextmanager
    def conditioned(self, features: Tensor | None) -> Iterator[None]:
        """Within the block, LM forwards cross-attend to ``features`` [B, N, d_v] (None: unconditioned)."""
        if features is not None:
            features = self.check_features(features)
            if not self._handles:
                raise RuntimeError("gated_xattn is not attached to an LM; call attach(llm) first")
        previous, self._features = self._features, features
        try:
            yield
        finally:
            self._features = previous

    def gates(self) -> Tensor:
        """``tanh`` of every gate, ``[num_blocks, 2]`` (attention, FFN) — 0 at initialisation."""
        return torch.tanh(torch.stack([torch.cat([b.attn_gate, b.ffn_gate]) for b in self.blocks]))


def connector_config(connector: nn.Module) -> dict[str, Any]:
    """The constructor arguments of a connector (name, dims and options) as plain types, for checkpoints."""
    cfg: dict[str, Any] = {"name": connector.name, "vision_dim": connector.vision_dim, "lm_dim": connector.lm_dim}
    if isinstance(connector, _Resampler):
        first = connector.layers[0]
        ffn = first.ffn
        attn = first.attn if isinstance(first, _PerceiverLayer) else first.cross_attn
        cfg.update(dim=connector.dim, depth=len(connector.layers), heads=attn.num_heads,
                   ffn_mult=ffn[1].out_features // connector.dim, max_inputs=connector.max_inputs)
        cfg["num_latents" if isinstance(connector, PerceiverResampler) else "num_queries"] = connector.num_queries
    elif isinstance(connector, GatedXAttnConnector):
        block = connector.blocks[0]
        cfg.update(num_lm_layers=connector.num_lm_layers, every=connector.every, heads=block.attn.num_heads,
                   ffn_mult=block.ffn[1].out_features // connector.lm_dim)
    return cfg


def connector_from_config(cfg: dict[str, Any]) -> nn.Module:
    """Inverse of :func:`connector_config` (fresh weights)."""
    cfg = dict(cfg)
    name = cfg.pop("name")
    return build_connector(name, **cfg)
