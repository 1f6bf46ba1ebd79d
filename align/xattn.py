"""Flamingo's gated cross-attention connector (``kind = "xattn"``), registered as ``gated_xattn``.

The ``GATED XATTN-DENSE`` blocks (tanh-gated cross-attention to the image features, then a tanh-gated
FFN, both gates initialised to 0) run before every ``every``-th frozen decoder layer.
:meth:`GatedXAttnConnector.attach` installs them with forward pre-hooks on the LM's decoder layers
(the hook replaces the layer's input hidden states by the block's output), so the LM's module tree and
state dict stay untouched and :meth:`detach` restores it exactly; the image features are set per
forward with ``with connector.conditioned(features):``. With the gates at 0 the LM computes exactly
what it computed before.
"""
from __future__ import annotations

import contextlib
from typing import Any, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from align.connectors import CONNECTORS, Connector, _check_sizes, _ffn
from align.llm import decoder_layers
from align.seeding import AffineMap, flat_tokens, map_r2, ridge

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
        _check_sizes(type(self).__name__, heads=heads, ffn_mult=ffn_mult)
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

    def seed(self, image_to_lm: AffineMap, image_to_shared: AffineMap | None = None,
             features: Tensor | np.ndarray | None = None, **options: Any) -> dict[str, float]:
        """Gates stay at 0; each block's value projection is fitted (ridge) from its normalised features to
        ``image_to_lm`` on ``features``, and its output projection is the identity."""
        self._check_seed_map(image_to_lm)
        if features is None:
            raise ValueError("seeding gated_xattn needs a sample of training features")
        x = flat_tokens(features)
        t = image_to_lm(x)
        r2 = []
        d = self.lm_dim
        for block in self.blocks:
            with torch.no_grad():
                nx = block.norm_x(torch.as_tensor(x, dtype=block.norm_x.weight.dtype,
                                                  device=block.norm_x.weight.device)).double().cpu().numpy()
            v = ridge(nx, t)
            dev, dt = block.attn.out_proj.weight.device, block.attn.out_proj.weight.dtype
            with torch.no_grad():
                block.attn.v_proj_weight.copy_(torch.as_tensor(v.weight.T, dtype=dt, device=dev))
                block.attn.in_proj_bias[2 * d:].copy_(torch.as_tensor(v.bias, dtype=dt, device=dev))
                block.attn.out_proj.weight.copy_(torch.eye(d, dtype=dt, device=dev))
                block.attn.out_proj.bias.zero_()
            r2.append(map_r2(v, nx, t))
        return {"v_proj_r2": float(np.mean(r2))}

    def gates(self) -> Tensor:
        """``tanh`` of every gate, ``[num_blocks, 2]`` (attention, FFN) — 0 at initialisation."""
        return torch.tanh(torch.stack([torch.cat([b.attn_gate, b.ffn_gate]) for b in self.blocks]))
