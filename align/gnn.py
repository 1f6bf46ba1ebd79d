"""GNN semantic alignment: message passing over graphs built from each modality's own input.

The image side is the grid of patch features (``[B, P=h*w, d_img]``, e.g. MobileNetV2's
4x4x1280 grid) as a grid graph with direction-typed edges and 2-D positional encodings; the
text side is a caption graph (word nodes; adjacency, modifier→noun and
subject→relation→object edges, see :mod:`align.graphs`). Each side runs edge-type-aware
convolutions (``RGCNConv`` or ``TransformerConv`` with edge-type features) and an attention
(or mean) readout, so which adjective sits on which noun, and which noun is left of which,
reach the embedding: "red circle left of blue square" and "blue circle left of red square"
have the same bag of words but different graphs. With ``skip=True`` a linear map of the mean
input features is added to the readout, so the graph branch learns only what the structure
adds (on few real pairs, the bare GNN overfits: see :class:`RelationalGraphEncoder`). Trained
with ``open_clip.loss.ClipLoss`` and a learnable logit scale.

Text batches: a :class:`align.graphs.GraphTensors`, the ``dict`` the default DataLoader
collate makes of its per-caption items, a ``torch_geometric`` ``Batch``/``Data``, or a list
of ``Data``.
"""
from __future__ import annotations

import logging
import math
from typing import Any, Mapping, Sequence

import torch
import torch.nn.functional as F
from open_clip.loss import ClipLoss
from torch import Tensor, nn
from torch_geometric.data import Batch, Data
from torch_geometric.nn import MessagePassing, RGCNConv, TransformerConv
from torch_geometric.nn.aggr import AttentionalAggregation, MeanAggregation
from torch_geometric.utils import scatter

from align.base import ALIGNERS, GradientAligner
from align.graphs import (
    NUM_TEXT_EDGE_TYPES,
    GraphTensors,
    batch_graph,
    grid_graph,
    grid_offsets,
    grid_positional_encoding,
)

log = logging.getLogger(__name__)

CONVS = ("rgcn", "rgcn_fused", "transformer")


class FusedRGCNConv(MessagePassing):
    """R-GCN (Schlichtkrull et al. 2018) with one matmul, one gather and one scatter per call.

    Same function and parameter layout as ``torch_geometric.nn.RGCNConv`` without bases
    (``weight`` [R, in, out], ``root`` [in, out], ``bias`` [out]; mean aggregation per relation,
    summed over relations, plus the root term), but where ``RGCNConv`` runs one propagate per
    relation, this projects every node through all R weights at once (``[n, R, out]``) and
    gathers the row of each edge's relation: ~R times fewer scatters, which dominate on CPU
    for small graphs batched by the hundred.
    """

    def __init__(self, in_channels: int, out_channels: int, num_relations: int) -> None:
        super().__init__(aggr="add")
        self.in_channels, self.out_channels, self.num_relations = in_channels, out_channels, num_relations
        self.weight = nn.Parameter(torch.empty(num_relations, in_channels, out_channels))
        self.root = nn.Parameter(torch.empty(in_channels, out_channels))
        self.bias = nn.Parameter(torch.zeros(out_channels))
        nn.init.xavier_uniform_(self.weight.view(num_relations * in_channels, out_channels))
        nn.init.xavier_uniform_(self.root)

    def forward(self, x: Tensor, edge_index: Tensor, edge_type: Tensor) -> Tensor:
        n, r = x.shape[0], self.num_relations
        projected = torch.einsum("ni,rio->nro", x, self.weight).reshape(n * r, self.out_channels)
        src, dst = edge_index
        # mean per (target node, relation), as RGCNConv's per-relation mean aggregation
        slot = dst * r + edge_type
        count = scatter(torch.ones_like(slot, dtype=x.dtype), slot, dim=0, dim_size=n * r, reduce="sum")
        norm = (1.0 / count.clamp(min=1.0))[slot]
        # ``projected`` has no _j suffix: PyG passes it whole, and each message picks its relation's row
        out = self.propagate(edge_index, projected=projected, rows=src * r + edge_type, norm=norm, size=(n, n))
        return out + x @ self.root + self.bias

    def message(self, projected: Tensor, rows: Tensor, norm: Tensor) -> Tensor:  # type: ignore[override]
        return projected[rows] * norm.unsqueeze(-1)


POOLS = ("attention", "mean")


class RelationalGraphEncoder(nn.Module):
    """Node features → ``layers`` edge-type-aware convolutions (residual, LayerNorm) →
    pooling per graph (``pool``: ``"attention"``, ``AttentionalAggregation``, or ``"mean"``) →
    dropout → linear head. Returns ``[num_graphs, out_dim]``.

    ``skip``: add a linear map of the graph's mean *input* node features to the output (a
    jumping-knowledge readout from layer 0). The graph branch then learns what the structure
    adds to the bag of nodes, and cannot do worse than a linear head on pooled features when few
    training pairs and small, noisy graphs (one noun, a 7x7 grid) make message passing overfit.
    """

    def __init__(
        self,
        in_dim: int,
        hidden: int,
        out_dim: int,
        layers: int,
        num_relations: int,
        conv: str = "rgcn",
        heads: int = 4,
        num_bases: int | None = None,
        dropout: float = 0.0,
        pool: str = "attention",
        skip: bool = False,
    ) -> None:
        super().__init__()
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if conv not in CONVS:
            raise ValueError(f"conv must be one of {CONVS}, got {conv!r}")
        if conv == "transformer" and hidden % heads:
            raise ValueError(f"hidden ({hidden}) must be divisible by heads ({heads})")
        if layers < 1:
            raise ValueError(f"layers must be >= 1, got {layers}")
        self.conv_kind = conv
        self.num_relations = num_relations
        self.in_proj = nn.Linear(in_dim, hidden)
        self.edge_emb = nn.Embedding(num_relations, hidden) if conv == "transformer" else None
        self.convs = nn.ModuleList()
        self.norms = nn.ModuleList()
        for _ in range(layers):
            if conv == "rgcn":
                self.convs.append(RGCNConv(hidden, hidden, num_relations, num_bases=num_bases))
            elif conv == "rgcn_fused":
                if num_bases is not None:
                    raise ValueError("conv='rgcn_fused' has no basis decomposition; use conv='rgcn' with num_bases")
                self.convs.append(FusedRGCNConv(hidden, hidden, num_relations))
            else:
                self.convs.append(TransformerConv(hidden, hidden // heads, heads=heads, edge_dim=hidden))
            self.norms.append(nn.LayerNorm(hidden))
        self.dropout = nn.Dropout(dropout)
        self.pool = (
            AttentionalAggregation(
                gate_nn=nn.Sequential(nn.Linear(hidden, hidden), nn.GELU(), nn.Linear(hidden, 1)),
                nn=nn.Sequential(nn.Linear(hidden, hidden), nn.GELU()),
            )
            if pool == "attention"
            else MeanAggregation()
        )
        self.head = nn.Linear(hidden, out_dim)
        self.skip = nn.Linear(in_dim, out_dim) if skip else None

    def forward(
        self,
        x: Tensor,
        edge_index: Tensor,
        edge_type: Tensor,
        batch: Tensor,
        num_graphs: int,
        node_bias: Tensor | None = None,
    ) -> Tensor:
        """``x`` [n, in_dim], ``edge_index`` [2, e], ``edge_type`` [e], ``batch`` [n] graph id
        of each node, ``node_bias`` [n, hidden] added after the input projection."""
        h = self.in_proj(x)
        if node_bias is not None:
            h = h + node_bias
        edge_attr = self.edge_emb(edge_type) if self.edge_emb is not None else None
        for conv, norm in zip(self.convs, self.norms):
            m = conv(h, edge_index, edge_type) if edge_attr is None else conv(h, edge_index, edge_attr)
            h = norm(h + self.dropout(F.gelu(m)))
        out = self.head(self.dropout(self.pool(h, index=batch, dim_size=num_graphs)))
        if self.skip is not None:
            out = out + self.skip(scatter(x, batch, dim=0, dim_size=num_graphs, reduce="mean"))
        return out


@ALIGNERS.register("gnn")
class GNNAligner(GradientAligner):
    """Aligns image patch grids and caption graphs with two relational GNNs and ClipLoss.

    ``image_dim``: patch feature size (1280 for MobileNetV2); ``text_dim``: node feature size
    (384 for MiniLM word embeddings). ``grid_size`` = ``(h, w)`` of the patch grid, or
    ``None`` to take the square grid of ``P`` patches. ``neighbourhood`` 4 or 8;
    ``conv`` ``"rgcn_fused"`` (default: R-GCN, :class:`FusedRGCNConv`), ``"rgcn"`` (PyG's
    ``RGCNConv``, same function, slower on CPU; allows ``num_bases``) or ``"transformer"``.
    ``dropout`` on each layer's messages and on the pooled vector; ``pool`` and ``skip`` as in
    :class:`RelationalGraphEncoder` (``pool="mean", skip=True, dropout=0.3`` for few, real
    pairs: ``experiments/configs/tuxpaint.yaml``).
    """

    modalities = ("image", "text")
    inputs = {"image": "grid", "text": "graph"}

    def __init__(
        self,
        image_dim: int,
        text_dim: int,
        embed_dim: int = 256,
        hidden: int = 256,
        layers: int = 2,
        *,
        conv: str = "rgcn_fused",
        heads: int = 4,
        num_bases: int | None = None,
        neighbourhood: int = 8,
        grid_size: tuple[int, int] | None = None,
        pos_dim: int = 32,
        num_text_relations: int = NUM_TEXT_EDGE_TYPES,
        dropout: float = 0.0,
        pool: str = "attention",
        skip: bool = False,
        init_logit_scale: float = math.log(1 / 0.07),
        max_logit_scale: float = 100.0,
        local_loss: bool = False,
        gather_with_grad: bool = True,
    ) -> None:
        super().__init__()
        self.config: dict[str, Any] = dict(
            image_dim=image_dim, text_dim=text_dim, embed_dim=embed_dim, hidden=hidden, layers=layers,
            conv=conv, heads=heads, num_bases=num_bases, neighbourhood=neighbourhood,
            grid_size=tuple(grid_size) if grid_size is not None else None, pos_dim=pos_dim,
            num_text_relations=num_text_relations, dropout=dropout, pool=pool, skip=skip,
            init_logit_scale=init_logit_scale,
            max_logit_scale=max_logit_scale, local_loss=local_loss, gather_with_grad=gather_with_grad,
        )  # fmt: skip
        self.image_dim, self.text_dim, self.embed_dim = image_dim, text_dim, embed_dim
        self.neighbourhood, self.grid_size, self.pos_dim = neighbourhood, self.config["grid_size"], pos_dim
        self.max_logit_scale = max_logit_scale
        self.local_loss, self.gather_with_grad = local_loss, gather_with_grad
        self.rank, self.world_size = 0, 1
        n_grid_rel = len(grid_offsets(neighbourhood))
        common = dict(conv=conv, heads=heads, num_bases=num_bases, dropout=dropout, pool=pool, skip=skip)
        self.image_encoder = RelationalGraphEncoder(image_dim, hidden, embed_dim, layers, n_grid_rel, **common)
        self.text_encoder = RelationalGraphEncoder(text_dim, hidden, embed_dim, layers, num_text_relations, **common)
        self.image_pos = nn.Linear(pos_dim, hidden)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.loss_fn = self._make_loss()
        # (h, w, device) -> (edge_index, edge_type, pos_enc) of one grid; derived, not state
        self._grid_cache: dict[tuple[int, int, str], tuple[Tensor, Tensor, Tensor]] = {}

    # ------------------------------------------------------------------ distributed / loss

    def _make_loss(self) -> ClipLoss:
        return ClipLoss(
            local_loss=self.local_loss,
            gather_with_grad=self.gather_with_grad,
            cache_labels=True,
            rank=self.rank,
            world_size=self.world_size,
        )

    def set_distributed(self, rank: int, world_size: int) -> None:
        """Gather features across ``world_size`` processes in the loss (rebuilds ClipLoss)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        self.rank, self.world_size = rank, world_size
        self.loss_fn = self._make_loss()

    def loss(self, batch: Mapping[str, Any]) -> Tensor:
        """Symmetric InfoNCE (``ClipLoss``) between ``batch["image"]`` [B, P, d_img] and the
        caption graphs ``batch["text"]`` (B graphs)."""
        missing = [m for m in self.modalities if m not in batch]
        if missing:
            raise KeyError(
                f"GNNAligner.loss needs batch keys {self.modalities}; missing {missing}, has {sorted(batch)}"
            )
        img = self.encode("image", batch["image"])
        txt = self.encode("text", batch["text"])
        if img.shape[0] != txt.shape[0]:
            raise ValueError(f"batch has {img.shape[0]} images but {txt.shape[0]} caption graphs")
        scale = self.logit_scale.clamp(max=math.log(self.max_logit_scale)).exp()
        return self.loss_fn(img, txt, scale)

    # ------------------------------------------------------------------ encoders

    def encode(self, modality: str, x: Any) -> Tensor:
        """L2-normalised embeddings ``[N, embed_dim]``: ``image`` grid features [N, P, d_img];
        ``text`` N caption graphs (``GraphTensors``, its collated ``dict``, PyG ``Batch``/``Data``
        or list of ``Data``)."""
        self._check_modality(modality)
        z = self._encode_image(x) if modality == "image" else self._encode_text(x)
        return F.normalize(z, dim=-1)

    def _grid(self, p: int, device: torch.device) -> tuple[Tensor, Tensor, Tensor]:
        if self.grid_size is not None:
            h, w = self.grid_size
            if h * w != p:
                raise ValueError(f"image has {p} patches but grid_size={self.grid_size} has {h * w}")
        else:
            h = math.isqrt(p)
            if h * h != p:
                raise ValueError(f"image has {p} patches, not a square grid; pass grid_size=(h, w)")
            w = h
        key = (h, w, str(device))
        if key not in self._grid_cache:
            ei, et = grid_graph(h, w, self.neighbourhood, self_loops=True, device=device)
            self._grid_cache[key] = (ei, et, grid_positional_encoding(h, w, self.pos_dim, device=device))
        return self._grid_cache[key]

    def _encode_image(self, x: Tensor) -> Tensor:
        if not isinstance(x, Tensor) or x.dim() != 3 or x.shape[-1] != self.image_dim:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"image must be grid features [B, P, {self.image_dim}], got {shape}")
        b, p, _ = x.shape
        ei, et, pos = self._grid(p, x.device)
        w = self.image_pos.weight
        pos_bias = self.image_pos(pos.to(w.dtype)).repeat(b, 1)
        edge_index, edge_type = batch_graph(ei, et, p, b)
        batch = torch.arange(b, device=x.device).repeat_interleave(p)
        return self.image_encoder(x.reshape(b * p, -1).to(w.dtype), edge_index, edge_type, batch, b, pos_bias)

    def _encode_text(self, x: Any) -> Tensor:
        feats, edge_index, edge_type, batch, n = self.text_inputs(x)
        if feats.dim() != 2 or feats.shape[1] != self.text_dim:
            raise ValueError(f"caption graph node features are {tuple(feats.shape)}, expected [n, {self.text_dim}]")
        if edge_type.numel() and int(edge_type.max()) >= self.text_encoder.num_relations:
            raise ValueError(
                f"caption graphs use edge type {int(edge_type.max())}, the text encoder has "
                f"{self.text_encoder.num_relations} (num_text_relations)"
            )
        dtype = self.text_encoder.in_proj.weight.dtype
        return self.text_encoder(feats.to(dtype), edge_index, edge_type, batch, n)

    @staticmethod
    def text_inputs(x: Any) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """``(x [n, d], edge_index [2, e], edge_type [e], batch [n], num_graphs)`` from any
        accepted caption-graph batch."""
        if isinstance(x, Mapping) and not isinstance(x, GraphTensors):
            x = GraphTensors.from_dict(x)
        if isinstance(x, GraphTensors):
            feats, ei, et, batch = x.to_sparse()
            return feats, ei, et, batch, len(x)
        if isinstance(x, Sequence) and x and all(isinstance(g, Data) for g in x):
            x = Batch.from_data_list(list(x))
        if isinstance(x, Data):
            if getattr(x, "edge_type", None) is None:
                raise ValueError("caption graph Data needs an edge_type attribute [e]")
            batch = getattr(x, "batch", None)
            if batch is None:
                batch = torch.zeros(x.num_nodes, dtype=torch.long, device=x.x.device)
            n = int(x.num_graphs) if isinstance(x, Batch) else 1
            return x.x, x.edge_index, x.edge_type, batch, n
        raise TypeError(
            "text must be GraphTensors, its collated dict, a torch_geometric Batch/Data or a list "
            f"of Data; got {type(x).__name__}"
        )


def graphs_to_data(graphs: Sequence[tuple[Tensor, Tensor, Tensor]]) -> list[Data]:
    """``(x, edge_index, edge_type)`` triples as PyG ``Data`` objects (for ``Batch``)."""
    return [Data(x=x, edge_index=ei, edge_type=et) for x, ei, et in graphs]
