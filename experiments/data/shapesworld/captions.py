"""ShapesWorld captions: how an object is named (a mention), caption templates, and their structured facts.

A caption is kept as (kind, template, style, facts) and rendered to text once; its facts, stored as JSON, are what
:func:`holds` checks against a scene record. :func:`_positive_captions` writes the true captions of a scene; the
hard negatives (:mod:`.negatives`) are edits of the same structures.
"""
from __future__ import annotations

from typing import NamedTuple, Sequence

from experiments.data.shapesworld.scenes import _REGION_MARGIN, _Stream, object_region, relation_holds
from experiments.data.shapesworld.vocab import (COLOUR_WORDS, DEPTH_RELATIONS, NUMBER_WORDS, REGION_WORDS,
                                                RELATION_WORDS, RELATIONS, SHAPE_WORDS, SIZE_WORDS,
                                                SPATIAL_RELATIONS, WHERE_WORDS)


class _Mention(NamedTuple):
    """An object as named in a caption; ``cw/sw/zw`` pick the synonym of colour/shape/size (modulo)."""

    colour: str
    shape: str
    size: str | None
    cw: int
    sw: int
    zw: int

    def words(self) -> str:
        w = _WORDS_CACHE.get(self)
        if w is None:
            ws = COLOUR_WORDS[self.colour]
            w = ws[self.cw % len(ws)]
            ws = SHAPE_WORDS[self.shape]
            w = f"{w} {ws[self.sw % len(ws)]}"
            if self.size:
                w = f"{SIZE_WORDS[self.size][self.zw % 3]} {w}"
            _WORDS_CACHE[self] = w
        return w

    def indefinite(self) -> str:
        w = self.words()
        return ("an " if w[0] in "aeiou" else "a ") + w

    def definite(self) -> str:
        return "the " + self.words()

    def desc(self) -> dict:
        return {"size": self.size, "colour": self.colour, "shape": self.shape}


_WORDS_CACHE: dict[_Mention, str] = {}  # pure function of the mention; bounded by the vocabulary


def _mention(obj: dict, rng: _Stream, p_size: float = 0.5) -> _Mention:
    size = obj["size"] if rng.random() < p_size else None
    return _Mention(obj["colour"], obj["shape"], size, rng.below(6), rng.below(6), rng.below(6))


class _Caption:
    """A caption as (kind, template, style, facts); facts are tuples holding _Mentions. Text rendered once."""

    __slots__ = ("kind", "template", "style", "facts", "text")

    def __init__(self, kind: str, template: int, style: int, facts: tuple) -> None:
        self.kind, self.template, self.style, self.facts = kind, template, style, facts
        self.text = _render(self)

    def with_facts(self, facts: tuple) -> "_Caption":
        return _Caption(self.kind, self.template, self.style, facts)

    def json_facts(self) -> list[dict]:
        return [_fact_json(f) for f in self.facts]

    def mentions(self) -> list[tuple[int, str]]:
        """(fact index, slot) of every mention in the facts."""
        out = []
        for i, f in enumerate(self.facts):
            if f[0] in ("exists", "at", "nearest"):
                out.append((i, "a"))
            elif f[0] == "rel":
                out += [(i, "a"), (i, "b")]
        return out


_TEMPLATES = {"list": 5, "rel": 4, "at": 3, "nearest": 3, "single": 6}


def _join(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _render(c: _Caption) -> str:
    t, st = c.template, c.style
    if c.kind == "list":
        ms = [f[1] for f in c.facts if f[0] == "exists"]
        lst = _join([m.indefinite() for m in ms])
        return (lst, f"a picture of {lst}", f"{NUMBER_WORDS[len(ms)]} shapes: {lst}", f"an image showing {lst}",
                f"a scene with {lst}")[t]
    if c.kind == "rel":
        _, a, r, b = c.facts[0]
        phrase = RELATION_WORDS[r][st % len(RELATION_WORDS[r])]
        if t == 0:
            return f"{a.indefinite()} {phrase} {b.indefinite()}"
        if t == 1:
            return f"{a.definite()} is {phrase} {b.definite()}"
        if t == 2:
            return f"there is {b.indefinite()}; {WHERE_WORDS[r][st % len(WHERE_WORDS[r])]} sits {a.indefinite()}"
        return f"{b.indefinite()} with {a.indefinite()} {phrase} it"
    if c.kind == "at":
        _, a, region = c.facts[0]
        phrase = REGION_WORDS[region][st % 2]
        return (f"{a.indefinite()} {phrase}", f"{a.definite()} is {phrase}", f"there is {a.indefinite()} {phrase}")[t]
    if c.kind == "nearest":
        a = c.facts[0][1]
        return (f"the nearest object is {a.indefinite()}", f"{a.definite()} is closest to the camera",
                f"closest to the viewer is {a.indefinite()}")[t]
    if c.kind == "single":
        a = c.facts[1][1]
        return (a.indefinite(), f"a single {a.words()}", f"one object: {a.indefinite()}",
                f"the only shape is {a.indefinite()}", f"{a.indefinite()} on its own",
                f"an image of {a.indefinite()}")[t]
    raise ValueError(f"unknown caption kind {c.kind!r}")


def _fact_json(f: tuple) -> dict:
    if f[0] == "exists":
        return {"type": "exists", "a": f[1].desc()}
    if f[0] == "count":
        return {"type": "count", "n": f[1]}
    if f[0] == "at":
        return {"type": "at", "a": f[1].desc(), "region": f[2]}
    if f[0] == "nearest":
        return {"type": "nearest", "a": f[1].desc()}
    if f[0] == "rel":
        return {"type": "relation", "a": f[1].desc(), "relation": f[2], "b": f[3].desc()}
    raise ValueError(f"unknown fact {f[0]!r}")


def matches(obj: dict, desc: dict) -> bool:
    """Whether an object record fits a description {colour, shape, size (None: any)}."""
    return (obj["colour"] == desc["colour"] and obj["shape"] == desc["shape"]
            and (desc.get("size") is None or obj["size"] == desc["size"]))


def fact_holds(scene: dict, fact: dict) -> bool:
    """Truth of one structured fact (as stored in ``caption_facts``) in a scene record."""
    objs = scene["objects"]
    kind = fact["type"]
    if kind == "exists":
        return any(matches(o, fact["a"]) for o in objs)
    if kind == "count":
        return len(objs) == fact["n"]
    if kind == "at":
        return any(matches(o, fact["a"]) and object_region(o) == fact["region"] for o in objs)
    if kind == "nearest":
        return matches(objs[scene["nearest"]], fact["a"])
    if kind == "relation":
        return any(i != j and matches(a, fact["a"]) and matches(b, fact["b"])
                   and relation_holds(a, fact["relation"], b)
                   for i, a in enumerate(objs) for j, b in enumerate(objs))
    raise ValueError(f"unknown fact type {kind!r}")


def holds(scene: dict, facts: Sequence[dict]) -> bool:
    """Truth of a caption's facts (a conjunction) in a scene record."""
    return all(fact_holds(scene, f) for f in facts)


def _true_caption(kind: str, scene: dict, rng: _Stream, relations: Sequence[str] = RELATIONS) -> _Caption | None:
    """A random true caption of ``kind`` about ``scene``, or None if the scene offers none."""
    objs = scene["objects"]
    style = rng.below(6)
    if kind == "list":
        order = rng.shuffled(range(len(objs)))
        ms = tuple(("exists", _mention(objs[i], rng)) for i in order)
        t = rng.below(_TEMPLATES["list"])
        return _Caption("list", t, style, ((("count", len(objs)),) if t == 2 else ()) + ms)
    if kind == "rel":
        rels = [r for r in scene["relations"] if r[1] in relations]
        if not rels:
            return None
        i, r, j = rng.choice(rels)
        return _Caption("rel", rng.below(_TEMPLATES["rel"]), style,
                        (("rel", _mention(objs[i], rng), r, _mention(objs[j], rng)),))
    if kind == "at":
        placed = [(o, object_region(o, _REGION_MARGIN)) for o in objs]
        placed = [(o, reg) for o, reg in placed if reg is not None]
        if not placed:
            return None
        o, reg = rng.choice(placed)
        return _Caption("at", rng.below(_TEMPLATES["at"]), style, (("at", _mention(o, rng), reg),))
    if kind == "nearest":
        return _Caption("nearest", rng.below(_TEMPLATES["nearest"]), style,
                        (("nearest", _mention(objs[scene["nearest"]], rng)),))
    if kind == "single":
        return _Caption("single", rng.below(_TEMPLATES["single"]), style,
                        (("count", 1), ("exists", _mention(objs[0], rng))))
    raise ValueError(f"unknown caption kind {kind!r}")


def _positive_captions(scene: dict, rng: _Stream, k: int) -> list[_Caption]:
    """``k`` distinct true captions; the first five use distinct kinds where the scene allows."""
    if len(scene["objects"]) == 1:
        kinds = ["single", "single", "single", "at", "at"]
    else:
        kinds = ["list", "rel:spatial", "rel:depth", "at", "nearest"]
    schedule = rng.shuffled(kinds)
    out: list[_Caption] = []
    texts: set[str] = set()
    for step in range(k):
        kind = schedule[step] if step < len(schedule) else rng.choice(kinds)
        for attempt in range(200):
            if attempt >= 20:  # that kind is exhausted or unavailable: any kind will do
                kind = rng.choice(kinds)
            name, _, which = kind.partition(":")
            rel = {"spatial": SPATIAL_RELATIONS, "depth": DEPTH_RELATIONS}.get(which, RELATIONS)
            cap = _true_caption(name, scene, rng, rel)
            if cap is not None and cap.text not in texts:
                out.append(cap)
                texts.add(cap.text)
                break
        else:  # pragma: no cover - synonyms and templates give far more than 20 distinct captions
            raise RuntimeError(f"could not write {k} distinct captions for scene {scene}")
    return out
