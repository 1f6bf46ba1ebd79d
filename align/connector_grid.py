"""``grid_tags``: the image as a short *layout* in the LM's own words — for each object-like grid cell, its
coordinates and the best word of each tag group ("3 1 red square 6 5 blue star none none none none").

``word_tags`` shows the LM an unordered set of words: it cannot say which colour belongs to which shape, how
many objects there are or where they are. ``grid_tags`` scores the vocabulary on every cell of the frozen
encoder's grid (``[B, N, d_v]``, ``N = s²``) with one linear scorer and picks up to ``cells`` cells by
non-maximum suppression: the best cell whose best score exceeds ``threshold`` is taken, then its 8
neighbours and every cell within ``suppress`` cells that shares one of its tags are dropped, and so on. For
each picked cell, in raster order (left to right, top to bottom), it emits:

* two coordinate tokens, the LM's embeddings of the digits of the cell's column and row (``1`` … ``s``,
  column first, ``1`` at the left and at the top);
* one token per tag group: the group's best word on that cell.

Unused cells are ``2 + tags`` copies of the ``blank`` word ("none"), so every image gives the same number
of tokens and the LM can count objects as the cells that are not blank.

With ``relations=True``, every pair of picked cells (in that order) follows as a phrase: the first cell's tags,
its horizontal and vertical relation to the second (``left``/``right``/``level``, ``above``/``below``/``level``,
from the cells' coordinates) and the second cell's tags ("red square left above blue star"): finding a phrase
instead of comparing two objects' digits. Measured on ShapesWorld (README, stage 2) it does not help: with 200
LoRA steps SmolLM2-135M answers relation questions at chance either way, although the layouts hold the answer.

Tag groups: the vocabulary is a list of groups of entries; an entry ``"blue|cobalt"`` is shown as its first
word and counts as present in a caption that uses any of its words. With one group (the default: the
captions' content words), each cell shows its ``per_group`` best words of that group.

Gradient: the words are discrete; training uses a straight-through estimator per group (value: the chosen
word's embedding; gradient: ``softmax(scores / temperature) @ E`` of the group). Which cells are picked is
not differentiated.

Seeding (:meth:`GridTags.seed`): as ``word_tags`` — ridge regression of entry presence in the sample images'
captions on the aligned space's image side (``image_to_shared`` of pooled features) — and the same scorer is
applied to every cell. The scorer is affine and the pooled features are the cells' mean, so the cells'
scores average to the image's: a cell scores high on the words its own content supports. This needs a grid
fine enough to resolve objects: on ShapesWorld, MobileNetV2's 8x8 grid (256 px input) names the colour of
the cell under an object's centre correctly 98 % of the time and its shape 91 % (the 4x4 grid at 128 px:
67 % and 59 %; a ridge fitted on the true per-cell labels does no better: 98 % / 92 % and 73 % / 63 %).
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch
from torch import Tensor, nn

from align.connector_tags import content_vocabulary, presence_inputs, seed_presence_scorer
from align.connector_words import LMWordVocabulary
from align.connectors import CONNECTORS, Connector
from align.seeding import AffineMap, bag_of_words, llm_text_embeddings

MAX_SIDE = 9  # coordinates are single digits
RELATION_WORDS = ("left", "right", "above", "below", "level")


def _groups(vocabulary: Sequence[Any]) -> list[list[str]]:
    """``vocabulary`` as groups of entries: a flat list of words is one group."""
    if not vocabulary:
        raise ValueError("grid_tags needs a non-empty vocabulary")
    if all(isinstance(v, str) for v in vocabulary):
        return [list(vocabulary)]
    if not all(isinstance(g, (list, tuple)) and g and all(isinstance(w, str) and w for w in g) for g in vocabulary):
        raise ValueError("grid_tags vocabulary: a list of words or a list of non-empty lists of words (tag groups), "
                         f"got {vocabulary!r}")
    return [list(g) for g in vocabulary]


@CONNECTORS.register("grid_tags")
class GridTags(LMWordVocabulary, Connector, nn.Module):
    """``[B, s², d_v]`` → ``[B, cells · (2 + tags per cell), d_lm]``: coordinates + tag words of the best cells.

    Args:
        vision_dim, lm_dim: feature and LM widths.
        vocabulary: tag words, or groups of entries (``"word|synonym"``); ``None``: the content words of the
            texts given to :meth:`bind`, as one group.
        cells: at most this many cells are shown per image (picked by non-maximum suppression).
        per_group: words per group per cell (for a single group; with several groups, 1 each).
        threshold: a cell is picked only when its best score exceeds this.
        suppress: a picked cell drops the cells within this many cells (Chebyshev distance) that share a tag.
        temperature: of the straight-through softmax.
        blank: the word that fills unused cells.
        relations: also emit a relation phrase for every pair of picked cells (module doc).
    """

    name = "grid_tags"
    seeds_from_lm_map = False

    def __init__(self, vision_dim: int, lm_dim: int, vocabulary: Sequence[Any] | None = None, cells: int = 4,
                 per_group: int = 2, threshold: float = 2.0, suppress: int = 2, temperature: float = 0.1,
                 blank: str = "none", relations: bool = False) -> None:
        nn.Module.__init__(self)
        if vision_dim < 1 or lm_dim < 1:
            raise ValueError(f"vision_dim and lm_dim must be >= 1, got {vision_dim}, {lm_dim}")
        if cells < 1 or per_group < 1 or suppress < 1:
            raise ValueError(f"cells, per_group and suppress must be >= 1, got {cells}, {per_group}, {suppress}")
        if temperature <= 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        if not blank.strip():
            raise ValueError("blank must be a word")
        self.vision_dim, self.lm_dim = vision_dim, lm_dim
        self.cells, self.per_group, self.suppress = cells, per_group, suppress
        self.threshold, self.temperature, self.blank = float(threshold), float(temperature), blank
        self.relations = bool(relations)
        self.register_buffer("marks", None)  # [1 + MAX_SIDE, d_lm]: the blank word, then the digits 1..9
        self.register_buffer("relation_marks", None)  # [len(RELATION_WORDS), d_lm] with relations
        self._init_vocabulary(vocabulary)

    default_vocabulary = staticmethod(content_vocabulary)

    def _make(self, words: list[Any]) -> None:
        self.groups = _groups(words)
        self.entries = [e for g in self.groups for e in g]
        spans, start = [], 0
        for g in self.groups:
            spans.append((start, start + len(g)))
            start += len(g)
        self.spans = spans
        super()._make([e.split("|")[0] for e in self.entries])
        self._config["vocabulary"] = [list(g) for g in self.groups] if len(self.groups) > 1 else list(self.groups[0])
        self.marks = torch.zeros(1 + MAX_SIDE, self.lm_dim)
        if self.relations:
            self.relation_marks = torch.zeros(len(RELATION_WORDS), self.lm_dim)

    @property
    def tags_per_cell(self) -> int:
        return self.per_group if len(self.groups) == 1 else len(self.groups)

    @property
    def bound(self) -> bool:
        return super().bound and bool(self.marks.abs().sum() > 0)

    def bind(self, llm: nn.Module, tokenizer: Any, texts: Sequence[str] = ()) -> None:
        super().bind(llm, tokenizer, texts)
        marks = llm_text_embeddings(llm, tokenizer, [self.blank] + [str(i) for i in range(1, MAX_SIDE + 1)])
        self.marks = torch.as_tensor(marks, dtype=self.score.weight.dtype, device=self.score.weight.device)
        if self.relations:
            rel = llm_text_embeddings(llm, tokenizer, list(RELATION_WORDS))
            self.relation_marks = torch.as_tensor(rel, dtype=self.score.weight.dtype, device=self.score.weight.device)

    def num_tokens(self, n_inputs: int) -> int:
        k, t = min(self.cells, n_inputs), self.tags_per_cell
        return k * (2 + t) + (k * (k - 1) // 2 * (2 * t + 2) if self.relations else 0)

    def _pairs(self, k: int) -> list[tuple[int, int]]:
        return [(a, b) for a in range(k) for b in range(a + 1, k)] if self.relations else []

    def _relation_indices(self, cells: Tensor, side: int) -> tuple[Tensor, Tensor]:
        """``[B, P]`` indices into :data:`RELATION_WORDS`: horizontal and vertical relation of each cell pair."""
        a, b = zip(*self._pairs(cells.shape[1]))
        ca, cb = cells[:, list(a)], cells[:, list(b)]
        dx, dy = cb % side - ca % side, cb // side - ca // side
        level = len(RELATION_WORDS) - 1
        h = torch.where(dx > 0, 0, torch.where(dx < 0, 1, level))  # first cell left / right of the second
        v = torch.where(dy > 0, 2, torch.where(dy < 0, 3, level))  # above / below
        return h, v

    def _side(self, n: int) -> int:
        s = round(n ** 0.5)
        if s * s != n or s > MAX_SIDE:
            raise ValueError(f"grid_tags needs a square grid of at most {MAX_SIDE}x{MAX_SIDE} cells, got {n} tokens")
        return s

    def cell_scores(self, x: Tensor) -> Tensor:
        """``[B, N, V]`` presence scores of the vocabulary entries on every grid cell."""
        self._check_bound()
        x = self.check_features(x).to(self.score.weight.dtype)
        self._side(x.shape[1])
        return self.score(x)

    def _slots(self, s: Tensor) -> list[tuple[Tensor, Tensor, int, int]]:
        """Per tag slot: (vocabulary index [B, N], score [B, N], group start, group end)."""
        out = []
        for a, b in self.spans:
            top = s[..., a:b].detach().topk(min(self.per_group if len(self.spans) == 1 else 1, b - a), dim=-1)
            out += [(top.indices[..., k] + a, top.values[..., k], a, b) for k in range(top.indices.shape[-1])]
        return out

    def _select(self, s: Tensor) -> tuple[list[tuple[Tensor, Tensor, int, int]], Tensor, Tensor]:
        """For cell scores ``s [B, N, V]``: the tag slots (:meth:`_slots`), the picked cells ``[B, K]`` and whether
        each is used ``[B, K]`` (:meth:`_pick`)."""
        slots = self._slots(s)
        cells, used = self._pick(slots, self._side(s.shape[1]))
        return slots, cells, used

    def _pick(self, slots: list[tuple[Tensor, Tensor, int, int]], side: int) -> tuple[Tensor, Tensor]:
        """``[B, K]`` the picked cells (non-maximum suppression, module doc) in raster order, unused ones last,
        and ``[B, K]`` whether each is used."""
        best = torch.stack([v for _, v, _, _ in slots], -1).amax(-1).clone()  # [B, N]
        tags = torch.stack([i for i, _, _, _ in slots], -1)  # [B, N, slots]
        n = best.shape[1]
        pos = torch.arange(n, device=best.device)
        dist = torch.maximum((pos[:, None] // side - pos // side).abs(), (pos[:, None] % side - pos % side).abs())
        rows = torch.arange(len(best), device=best.device)
        picked, used = [], []
        for _ in range(min(self.cells, n)):
            c = best.argmax(1)  # [B]
            used.append(best[rows, c] > self.threshold)
            picked.append(c)
            share = (tags == tags[rows, c][:, None]).any(-1)
            drop = (dist[c] <= 1) | ((dist[c] <= self.suppress) & share)
            best = best.masked_fill(drop, float("-inf"))
        picked_t, used_t = torch.stack(picked, 1), torch.stack(used, 1)
        order = torch.where(used_t, picked_t, picked_t + n).argsort(1)
        return picked_t.gather(1, order), used_t.gather(1, order)

    def forward(self, x: Tensor) -> Tensor:
        s = self.cell_scores(x)  # [B, N, V]
        side = self._side(s.shape[1])
        slots, cells, used = self._select(s)  # cells, used: [B, K]
        d = self.lm_dim
        pick = lambda t: t.gather(1, cells.view(*cells.shape, *([1] * (t.dim() - 2))).expand(-1, -1, *t.shape[2:]))
        parts = [self.marks[1 + cells % side], self.marks[1 + cells // side]]  # column, row digits
        sc = pick(s)  # [B, K, V]
        for idx, _, a, b in slots:
            soft = torch.softmax(sc[..., a:b] / self.temperature, dim=-1) @ self.embeddings[a:b]
            parts.append(self.embeddings[pick(idx)] + (soft - soft.detach()))  # straight-through
        out = torch.stack(parts, dim=2)  # [B, K, 2 + tags, d]
        out = torch.where(used[..., None, None], out, self.marks[0].expand_as(out))
        pairs = self._pairs(cells.shape[1])
        if not pairs:
            return out.reshape(len(s), -1, d)
        h, v = self._relation_indices(cells, side)  # [B, P]
        tags = out[:, :, 2:]  # [B, K, tags, d]
        a, b = (list(i) for i in zip(*pairs))
        phrases = torch.cat([tags[:, a], self.relation_marks[h][:, :, None], self.relation_marks[v][:, :, None],
                             tags[:, b]], 2)  # [B, P, 2 tags + 2, d]
        both = used[:, a] & used[:, b]
        phrases = torch.where(both[..., None, None], phrases, self.marks[0].expand_as(phrases))
        return torch.cat([out.reshape(len(s), -1, d), phrases.reshape(len(s), -1, d)], 1)

    def layout(self, x: Tensor) -> list[str]:
        """What each image shows the LM, as text: ``"col row word word; …"`` per picked cell, then (``relations``)
        ``"; word word rel rel word word"`` per pair of picked cells."""
        s = self.cell_scores(x).detach()
        side = self._side(s.shape[1])
        slots, cells, used = self._select(s)
        words = [[" ".join(self.words[int(i[b, c])] for i, _, _, _ in slots) for c in cs]
                 for b, cs in enumerate(cells.tolist())]
        out = ["; ".join(f"{c % side + 1} {c // side + 1} {w}" for c, u, w in zip(cs, us, ws) if u)
               for cs, us, ws in zip(cells.tolist(), used.tolist(), words)]
        pairs = self._pairs(cells.shape[1])
        if pairs:
            h, v = self._relation_indices(cells, side)
            for b in range(len(out)):
                out[b] += "".join(f"; {words[b][i]} {RELATION_WORDS[h[b, p]]} {RELATION_WORDS[v[b, p]]} {words[b][j]}"
                                  for p, (i, j) in enumerate(pairs) if used[b, i] and used[b, j])
        return out

    def presence(self, texts: Sequence[Sequence[str]]) -> np.ndarray:
        """``[n, V]`` whether any caption of image ``i`` uses any word of each entry."""
        words = sorted({w for e in self.entries for w in e.split("|")})
        bag = np.stack([bag_of_words(list(caps), words).max(0) for caps in texts])  # [n, W]
        col = {w: i for i, w in enumerate(words)}
        return np.stack([bag[:, [col[w] for w in e.split("|")]].max(1) for e in self.entries], 1)

    def seed(self, image_to_lm: AffineMap, image_to_shared: AffineMap | None = None,
             features: Tensor | np.ndarray | None = None, texts: Sequence[Sequence[str]] | None = None,
             **options: Any) -> dict[str, float]:
        """Scorer = ridge regression of entry presence in ``texts[i]`` on ``image_to_shared`` of the pooled
        ``features [n, N, d_v]`` (module doc); applied per cell."""
        if features is not None and features.ndim != 3:
            raise ValueError(f"grid_tags seeds from grid features [n, N, d_v], got shape {tuple(features.shape)}")
        cells = presence_inputs(self, image_to_shared, features, texts)
        alpha = seed_presence_scorer(self.score, image_to_shared, cells.mean(1), self.presence(texts))
        with torch.no_grad():
            _, _, used = self._select(self.cell_scores(torch.as_tensor(cells, dtype=self.score.weight.dtype)))
        return {"ridge_alpha": alpha, "mean_cells_shown": float(used.sum(1).float().mean())}
