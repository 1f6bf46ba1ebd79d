"""Image side of the GNN aligner: a grid of patch features as a graph, one node per patch, one edge type per
direction (:func:`grid_graph`), a fixed 2-D sinusoidal positional encoding, and batching of one graph."""
from __future__ import annotations

import math

import torch
from torch import Tensor

#: Neighbour offsets ``(dy, dx)``; the edge type of a grid edge is the offset's index here.
GRID_OFFSETS_4: tuple[tuple[int, int], ...] = ((0, 0), (0, -1), (0, 1), (-1, 0), (1, 0))
GRID_OFFSETS_8: tuple[tuple[int, int], ...] = GRID_OFFSETS_4 + ((-1, -1), (-1, 1), (1, -1), (1, 1))


def grid_offsets(neighbourhood: int, self_loops: bool = True) -> tuple[tuple[int, int], ...]:
    if neighbourhood not in (4, 8):
        raise ValueError(f"neighbourhood must be 4 or 8, got {neighbourhood}")
    offs = GRID_OFFSETS_4 if neighbourhood == 4 else GRID_OFFSETS_8
    return offs if self_loops else offs[1:]


def grid_graph(
    h: int, w: int, neighbourhood: int = 8, self_loops: bool = True, device: torch.device | str | None = None
) -> tuple[Tensor, Tensor]:
    """Grid graph of ``h x w`` patches in row-major order: ``(edge_index [2, E], edge_type [E])``.

    An edge ``src -> dst`` joins patch ``dst = (y, x)`` to its neighbour ``src = (y+dy, x+dx)``;
    its type is the index of ``(dy, dx)`` in :func:`grid_offsets` (0 = self loop when present).
    """
    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    ys, xs = ys.reshape(-1), xs.reshape(-1)
    src_l, dst_l, typ_l = [], [], []
    for t, (dy, dx) in enumerate(grid_offsets(neighbourhood, self_loops)):
        ny, nx = ys + dy, xs + dx
        ok = (ny >= 0) & (ny < h) & (nx >= 0) & (nx < w)
        src_l.append((ny * w + nx)[ok])
        dst_l.append((ys * w + xs)[ok])
        typ_l.append(torch.full((int(ok.sum()),), t, dtype=torch.long, device=device))
    return torch.stack([torch.cat(src_l), torch.cat(dst_l)]), torch.cat(typ_l)


def grid_positional_encoding(h: int, w: int, dim: int, device: torch.device | str | None = None) -> Tensor:
    """Fixed 2-D sinusoidal encoding ``[h*w, dim]``: half the channels for the row, half for
    the column (``dim`` divisible by 4)."""
    if dim % 4:
        raise ValueError(f"positional encoding dim must be divisible by 4, got {dim}")
    q = dim // 4
    freqs = torch.exp(-math.log(100.0) * torch.arange(q, device=device) / q)  # 1 .. 1/100

    def enc(pos: Tensor) -> Tensor:
        a = pos.float()[:, None] * freqs[None]
        return torch.cat([a.sin(), a.cos()], dim=1)

    ys, xs = torch.meshgrid(torch.arange(h, device=device), torch.arange(w, device=device), indexing="ij")
    return torch.cat([enc(ys.reshape(-1)), enc(xs.reshape(-1))], dim=1)


def batch_graph(edge_index: Tensor, edge_type: Tensor, num_nodes: int, batch_size: int) -> tuple[Tensor, Tensor]:
    """Repeat one graph ``batch_size`` times, offsetting node ids by ``num_nodes`` per copy."""
    offsets = torch.arange(batch_size, device=edge_index.device) * num_nodes
    ei = (edge_index[:, None, :] + offsets[None, :, None]).reshape(2, -1)
    return ei, edge_type.repeat(batch_size)
