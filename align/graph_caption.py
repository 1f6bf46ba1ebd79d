"""Caption parsing for the GNN aligner: a small rule-based English chunker that turns a caption string into word
nodes (modifiers, head nouns, spatial relations) and typed edges (word adjacency, modifier→noun,
subject→relation→object), see :func:`parse_caption`. Strings only: no embeddings, no tensors."""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Sequence

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
