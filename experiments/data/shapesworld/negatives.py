"""ShapesWorld false captions: compositional hard negatives (minimal edits of a true caption, each checked false
for its scene) and the noisy captions of the redundant fusion task."""
from __future__ import annotations

from experiments.data.shapesworld.captions import _Caption, _Mention, _true_caption, holds
from experiments.data.shapesworld.scenes import _Stream
from experiments.data.shapesworld.vocab import (COLOUR_WORDS, COLOURS, HARD_NEGATIVE_KINDS, REVERSE_RELATION,
                                                SHAPE_WORDS, SHAPES)


def _replace_mention(cap: _Caption, at: tuple[int, str], new: _Mention) -> _Caption:
    i, slot = at
    f = list(cap.facts[i])
    f[1 if slot == "a" else 3] = new
    facts = list(cap.facts)
    facts[i] = tuple(f)
    return cap.with_facts(tuple(facts))


def _get_mention(cap: _Caption, at: tuple[int, str]) -> _Mention:
    i, slot = at
    return cap.facts[i][1 if slot == "a" else 3]


def _perturb(kind: str, scene: dict, rng: _Stream) -> tuple[_Caption, _Caption] | None:
    """(negative, source): a true caption and a perturbation of it of ``kind`` (maybe still true; checked later)."""
    multi = len(scene["objects"]) > 1
    if kind == "swap_attributes":
        src = _true_caption(rng.choice(("rel", "list")), scene, rng)
        if src is None:
            return None
        ments = src.mentions()
        p, q = rng.shuffled(range(len(ments)))[:2]
        a, b = _get_mention(src, ments[p]), _get_mention(src, ments[q])
        attrs = [x for x in ("colour", "shape", "size") if getattr(a, x) != getattr(b, x)
                 and getattr(a, x) is not None and getattr(b, x) is not None]
        if not attrs:
            return None
        attr = rng.choice(attrs)
        neg = _replace_mention(src, ments[p], a._replace(**{attr: getattr(b, attr)}))
        neg = _replace_mention(neg, ments[q], b._replace(**{attr: getattr(a, attr)}))
        return neg, src
    if kind == "reverse_relation":
        src = _true_caption("rel", scene, rng)
        if src is None:
            return None
        _, a, r, b = src.facts[0]
        return src.with_facts((("rel", a, REVERSE_RELATION[r], b),)), src
    if kind == "change_attribute":
        src = _true_caption(rng.choice(("rel", "list", "at", "nearest") if multi else ("single", "at")), scene, rng)
        if src is None:
            return None
        at = rng.choice(src.mentions())
        m = _get_mention(src, at)
        attr = rng.choice(("colour", "shape", "size"))
        if attr == "size":  # a mention without a size word gets the wrong one
            true_size = next(o["size"] for o in scene["objects"] if o["colour"] == m.colour and o["shape"] == m.shape)
            new = "large" if true_size == "small" else "small"
        else:
            values = COLOURS if attr == "colour" else SHAPES
            new = rng.choice([v for v in values if v != getattr(m, attr)])
        return _replace_mention(src, at, m._replace(**{attr: new})), src
    raise ValueError(f"unknown hard-negative kind {kind!r}")


def _hard_negatives(scene: dict, rng: _Stream, k: int, positives: set[str]) -> list[tuple[_Caption, str, _Caption]]:
    """``k`` distinct false captions as (negative, kind, source); one-object scenes only get changed attributes."""
    kinds = list(HARD_NEGATIVE_KINDS) if len(scene["objects"]) > 1 else ["change_attribute"]
    schedule = rng.shuffled(kinds)
    out: list[tuple[_Caption, str, _Caption]] = []
    texts = set(positives)
    for step in range(k):
        kind = schedule[step % len(schedule)]
        for attempt in range(300):
            if attempt == 30:  # e.g. no two objects differ in a swappable attribute
                kind = "change_attribute"
            pair = _perturb(kind, scene, rng)
            if pair is None:
                continue
            neg, src = pair
            if neg.text not in texts and not holds(scene, neg.json_facts()):
                out.append((neg, kind, src))
                texts.add(neg.text)
                break
        else:  # pragma: no cover
            raise RuntimeError(f"could not write {k} hard negatives for scene {scene}")
    return out


_NOISY_TEMPLATES = ("the largest object is {}", "the biggest shape is {}", "the largest shape in the picture is {}")


def _noisy_caption(scene: dict, rng: _Stream, noise: float) -> tuple[str, bool]:
    """A caption naming the largest object's shape; with probability ``noise`` the shape word is another shape's."""
    obj = scene["objects"][scene["largest"]]
    corrupted = rng.random() < noise
    shape = rng.choice([s for s in SHAPES if s != obj["shape"]]) if corrupted else obj["shape"]
    colours, shapes = COLOUR_WORDS[obj["colour"]], SHAPE_WORDS[shape]
    colour = colours[rng.below(len(colours))] + " " if rng.random() < 0.5 else ""
    words = colour + shapes[rng.below(len(shapes))]
    t = rng.below(len(_NOISY_TEMPLATES) + 1)
    if t == len(_NOISY_TEMPLATES):
        return f"the {words} is the largest object", corrupted
    return _NOISY_TEMPLATES[t].format(("an " if words[0] in "aeiou" else "a ") + words), corrupted
