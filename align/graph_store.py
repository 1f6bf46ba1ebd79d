"""Caption graphs stored padded (:class:`GraphTensors`: they slice and collate like tensors), built once per caption
(:class:`TextGraphBuilder`, :func:`build_caption_graphs` with a ``.safetensors`` cache), and paired with image grid
features (:class:`GraphTextDataset`)."""
from __future__ import annotations

import hashlib
import logging
import numbers
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from align.graph_caption import PARSER_VERSION, parse_caption
from align.graph_words import ContextualWordEmbedder, WordEmbedder, caption_to_graph, graph_from_parsed

log = logging.getLogger(__name__)

_GRAPH_KEYS = ("x", "num_nodes", "edge_index", "edge_type", "num_edges")


@dataclass(frozen=True)
class GraphTensors:
    """Many small typed graphs stored padded, so they slice and collate like tensors.

    ``x`` [N, n_max, d] node features (zero padded); ``num_nodes`` [N];
    ``edge_index`` [N, 2, e_max] node indices local to each graph; ``edge_type`` [N, e_max];
    ``num_edges`` [N]. Entries past ``num_nodes``/``num_edges`` are padding.

    ``gt[i]`` (int) is one graph as a ``dict`` of unbatched tensors: PyTorch's default
    collate stacks such dicts back into this layout (``GraphTensors.from_dict`` reads it);
    ``gt[a:b]`` or ``gt[index_tensor]`` is a ``GraphTensors`` of those graphs.
    """

    x: Tensor
    num_nodes: Tensor
    edge_index: Tensor
    edge_type: Tensor
    num_edges: Tensor

    def __post_init__(self) -> None:
        n = self.x.shape[0] if self.x.dim() == 3 else -1
        shapes = {k: tuple(getattr(self, k).shape) for k in _GRAPH_KEYS}
        ok = (
            self.x.dim() == 3
            and shapes["num_nodes"] == (n,)
            and shapes["num_edges"] == (n,)
            and self.edge_index.dim() == 3
            and shapes["edge_index"][:2] == (n, 2)
            and shapes["edge_type"] == (n, shapes["edge_index"][2])
        )
        if not ok:
            raise ValueError(
                "GraphTensors expects x [N, n_max, d], num_nodes [N], edge_index [N, 2, e_max], "
                f"edge_type [N, e_max], num_edges [N]; got {shapes}"
            )

    @classmethod
    def from_graphs(
        cls,
        graphs: Sequence[tuple[Tensor, Tensor, Tensor]],
        max_nodes: int | None = None,
        max_edges: int | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> "GraphTensors":
        """Pad a list of ``(x [n, d], edge_index [2, e], edge_type [e])`` graphs."""
        if not graphs:
            raise ValueError("from_graphs needs at least one graph")
        d = graphs[0][0].shape[1]
        n_max = max_nodes if max_nodes is not None else max(g[0].shape[0] for g in graphs)
        e_max = max_edges if max_edges is not None else max(g[1].shape[1] for g in graphs)
        N = len(graphs)
        x = torch.zeros(N, n_max, d, dtype=dtype)
        ei = torch.zeros(N, 2, e_max, dtype=torch.long)
        et = torch.zeros(N, e_max, dtype=torch.long)
        nn_, ne = torch.zeros(N, dtype=torch.long), torch.zeros(N, dtype=torch.long)
        for i, (xi, eii, eti) in enumerate(graphs):
            n, e = xi.shape[0], eii.shape[1]
            if xi.dim() != 2 or xi.shape[1] != d:
                raise ValueError(f"graph {i}: node features {tuple(xi.shape)}, expected [n, {d}]")
            if n > n_max or e > e_max:
                raise ValueError(f"graph {i} has {n} nodes/{e} edges, over max {n_max}/{e_max}")
            if eii.shape != (2, e) or eti.shape != (e,):
                raise ValueError(
                    f"graph {i}: edge_index {tuple(eii.shape)} / edge_type {tuple(eti.shape)} mismatch"
                )
            if e and (int(eii.min()) < 0 or int(eii.max()) >= n):
                raise ValueError(f"graph {i}: edge_index refers to nodes outside [0, {n})")
            x[i, :n] = xi
            ei[i, :, :e] = eii
            et[i, :e] = eti
            nn_[i], ne[i] = n, e
        return cls(x, nn_, ei, et, ne)

    @classmethod
    def from_dict(cls, d: Mapping[str, Tensor]) -> "GraphTensors":
        """From a mapping with keys ``x, num_nodes, edge_index, edge_type, num_edges``."""
        missing = [k for k in _GRAPH_KEYS if k not in d]
        if missing:
            raise KeyError(f"graph dict lacks keys {missing}; has {sorted(d)}")
        return cls(**{k: d[k] for k in _GRAPH_KEYS})

    def as_dict(self) -> dict[str, Tensor]:
        return {k: getattr(self, k) for k in _GRAPH_KEYS}

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __repr__(self) -> str:
        return (
            f"GraphTensors(n={len(self)}, max_nodes={self.x.shape[1]}, dim={self.x.shape[2]}, "
            f"max_edges={self.edge_index.shape[2]})"
        )

    def __getitem__(self, idx):  # int -> dict of one graph; slice / index -> GraphTensors
        if isinstance(idx, numbers.Integral) or (isinstance(idx, Tensor) and idx.dim() == 0):
            return {k: getattr(self, k)[idx] for k in _GRAPH_KEYS}
        return GraphTensors(**{k: getattr(self, k)[idx] for k in _GRAPH_KEYS})

    def to(self, device: torch.device | str) -> "GraphTensors":
        return GraphTensors(**{k: getattr(self, k).to(device) for k in _GRAPH_KEYS})

    def to_sparse(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Concatenate the graphs PyG-style: ``(x [n_total, d], edge_index [2, e_total],
        edge_type [e_total], batch [n_total])`` with node indices offset per graph."""
        N, n_max, _ = self.x.shape
        e_max = self.edge_index.shape[2]
        dev = self.x.device
        node_mask = torch.arange(n_max, device=dev) < self.num_nodes[:, None]
        edge_mask = torch.arange(e_max, device=dev) < self.num_edges[:, None]
        offsets = torch.cumsum(self.num_nodes, 0) - self.num_nodes
        ei = (self.edge_index + offsets[:, None, None]).permute(1, 0, 2)[:, edge_mask]
        batch = torch.repeat_interleave(torch.arange(N, device=dev), self.num_nodes)
        return self.x[node_mask], ei, self.edge_type[edge_mask], batch

    def save(self, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
        """Write to a ``.safetensors`` file atomically (temp file + ``os.replace``)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp")
        save_file({k: v.contiguous() for k, v in self.as_dict().items()}, str(tmp), metadata=dict(metadata or {}))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike) -> "GraphTensors":
        from safetensors.torch import load_file

        return cls.from_dict(load_file(str(path)))


def graph_format(embedder: type = ContextualWordEmbedder) -> str:
    """What caption graphs built with an ``embedder`` of this type are made of (parser version, embedder type):
    part of every cache key of graphs and of results computed from them."""
    return f"parser={PARSER_VERSION}|{embedder.__module__}.{embedder.__qualname__}"


class TextGraphBuilder:
    """Builds caption graphs with a frozen word embedder, caching graphs per caption string.

    ``embedder`` defaults to MiniLM's contextual token features
    (:meth:`ContextualWordEmbedder.from_minilm`); ``StaticWordEmbedder.from_minilm()`` gives its
    static input embeddings (one row per word whatever the caption), and any :class:`WordEmbedder`
    works. An embedder with ``embed_many(list of token lists)`` is called in batches by :meth:`build`.
    """

    def __init__(self, embedder: WordEmbedder | None = None) -> None:
        self.embedder = embedder if embedder is not None else ContextualWordEmbedder.from_minilm()
        self._graphs: dict[str, tuple[Tensor, Tensor, Tensor]] = {}

    @property
    def dim(self) -> int:
        return int(self.embedder.dim)

    def graph(self, text: str) -> tuple[Tensor, Tensor, Tensor]:
        """``(node_feats [n, dim], edge_index [2, e], edge_type [e])`` of one caption."""
        g = self._graphs.get(text)
        if g is None:
            g = self._graphs[text] = caption_to_graph(text, self.embedder)
        return g

    def build(self, texts: Sequence[str], progress: bool = True, **pad_kw) -> GraphTensors:
        """Graphs of ``texts`` (in order), padded into :class:`GraphTensors`."""
        unique = [t for t in dict.fromkeys(texts) if t not in self._graphs]
        many = getattr(self.embedder, "embed_many", None)
        chunk = int(getattr(self.embedder, "batch_size", 64)) if many is not None else 1
        if many is not None:  # batches of similar length carry little padding
            parsed_all = {t: parse_caption(t) for t in unique}
            unique.sort(key=lambda t: len(parsed_all[t].tokens))
        bar = tqdm(total=len(unique), desc="caption graphs", disable=None if progress else True)
        for i in range(0, len(unique), chunk):
            part = unique[i : i + chunk]
            if many is not None:
                parsed = [parsed_all[t] for t in part]
                for t, p, f in zip(part, parsed, many([list(p.tokens) for p in parsed])):
                    self._graphs[t] = graph_from_parsed(p, f)
            else:
                self.graph(part[0])
            bar.update(len(part))
        bar.close()
        return GraphTensors.from_graphs([self.graph(t) for t in texts], **pad_kw)


def build_caption_graphs(
    texts: Sequence[str],
    builder: TextGraphBuilder | None = None,
    *,
    progress: bool = True,
    cache_path: str | os.PathLike | None = None,
) -> GraphTensors:
    """Caption graphs for ``texts`` with a progress bar, optionally cached at ``cache_path``.

    The cache file is a ``.safetensors`` file keyed by a hash of the texts, the parser version
    and the embedder's type and size; a stale file is rebuilt and replaced.
    """
    builder = builder if builder is not None else TextGraphBuilder()
    emb = builder.embedder
    tag = f"{graph_format(type(emb))}|dim={emb.dim}"
    key = hashlib.sha1(("\x00".join(texts) + "\x01" + tag).encode()).hexdigest()
    if cache_path is not None and Path(cache_path).is_file():
        from safetensors import safe_open

        with safe_open(str(cache_path), framework="pt") as fh:
            stored = (fh.metadata() or {}).get("texts_sha1")
        if stored == key:
            log.info("loaded %d caption graphs from %s", len(texts), cache_path)
            return GraphTensors.load(cache_path)
        log.warning("caption graph cache %s is for other texts or parser; rebuilding", cache_path)
    graphs = builder.build(texts, progress=progress)
    if cache_path is not None:
        graphs.save(cache_path, metadata={"texts_sha1": key})
    return graphs


class GraphTextDataset(Dataset):
    """Pairs of image grid features and caption graphs, one item per caption.

    ``image`` [N_img, P, d]; ``text`` :class:`GraphTensors` [N_text]; ``text_to_image``
    [N_text] gives each caption's image row (default: identity). Items are
    ``{"image": [P, d], "text": dict of one graph}``; the default DataLoader collate turns a
    list of them into ``{"image": [B, P, d], "text": dict of padded tensors}``, which
    :class:`align.gnn.GNNAligner` reads directly.
    """

    def __init__(
        self, image: Tensor, text: GraphTensors, text_to_image: Sequence[int] | Tensor | None = None
    ) -> None:
        if text_to_image is None:
            if len(image) != len(text):
                raise ValueError(
                    f"image has {len(image)} rows but text has {len(text)} graphs; pass text_to_image"
                )
            text_to_image = torch.arange(len(text))
        t2i = torch.as_tensor(text_to_image, dtype=torch.long)
        if t2i.shape != (len(text),):
            raise ValueError(f"text_to_image has shape {tuple(t2i.shape)}, expected ({len(text)},)")
        if len(t2i) and (int(t2i.min()) < 0 or int(t2i.max()) >= len(image)):
            raise ValueError(f"text_to_image refers to images outside [0, {len(image)})")
        self.image, self.text, self.text_to_image = image, text, t2i

    def __len__(self) -> int:
        return len(self.text)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.image[self.text_to_image[i]], "text": self.text[int(i)]}
