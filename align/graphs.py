"""Graphs built from each modality's own input, for the GNN aligner (``align.gnn``).

* **Image**: a grid of patch features ``[B, P=h*w, d]`` becomes a grid graph, one node per
  patch, edges to the 4- or 8-neighbourhood plus self loops, one edge type per direction
  (so message passing knows left from right), and a fixed 2-D sinusoidal positional encoding.
* **Text**: a caption string is parsed by a small rule-based English chunker into word
  nodes (modifiers, head nouns, spatial relations) with typed edges: word adjacency,
  modifier→noun and subject→relation→object. Node features come from a frozen encoder:
  MiniLM's contextual token features by default (:class:`ContextualWordEmbedder`, mean over
  each word's wordpieces), its static input embeddings (:class:`StaticWordEmbedder`) or any
  :class:`WordEmbedder`.

Caption graphs are built once and stored padded in :class:`GraphTensors`, which slices like
a tensor (``encode_in_batches``) and whose per-caption samples collate with PyTorch's
default collate (``dict`` of stacked tensors), so :class:`GraphTextDataset` needs no
``collate_fn``. Nothing here looks at a data generator's scene metadata: graphs come from
pixels (their features) and strings only.

The code lives in one module per concern, re-exported here (every ``from align.graphs import ...`` works):
:mod:`align.graph_caption` (parsing), :mod:`align.graph_words` (node features), :mod:`align.graph_store`
(padded storage, builder, cache, dataset), :mod:`align.graph_grid` (image grid graphs).
"""
from __future__ import annotations

from align.graph_caption import (
    NUM_TEXT_EDGE_TYPES,
    PARSER_VERSION,
    SPATIAL_HEADS,
    TEXT_EDGE_TYPES,
    CaptionNode,
    ParsedCaption,
    parse_caption,
    tokenize_caption,
)
from align.graph_grid import (
    GRID_OFFSETS_4,
    GRID_OFFSETS_8,
    batch_graph,
    grid_graph,
    grid_offsets,
    grid_positional_encoding,
)
from align.graph_store import GraphTensors, GraphTextDataset, TextGraphBuilder, build_caption_graphs
from align.graph_words import (
    ContextualWordEmbedder,
    StaticWordEmbedder,
    WordEmbedder,
    caption_to_graph,
    graph_from_parsed,
)

__all__ = [
    "TEXT_EDGE_TYPES", "NUM_TEXT_EDGE_TYPES", "PARSER_VERSION", "SPATIAL_HEADS", "CaptionNode", "ParsedCaption",
    "parse_caption", "tokenize_caption", "WordEmbedder", "StaticWordEmbedder", "ContextualWordEmbedder",
    "caption_to_graph", "graph_from_parsed",
    "GraphTensors", "TextGraphBuilder", "build_caption_graphs", "GraphTextDataset", "GRID_OFFSETS_4",
    "GRID_OFFSETS_8", "grid_offsets", "grid_graph", "grid_positional_encoding", "batch_graph",
]
