"""Visual instruction data from ShapesWorld scene metadata (LLaVA generated its data from captions and boxes).

Question types (each with several phrasings; :data:`HELD_OUT_PHRASINGS` are never used for training):

* ``colour``: the colour of a named shape (asked only when that shape occurs once in the scene);
* ``shape``: the shape of the object of a named colour (only when that colour occurs once);
* ``count``: how many objects, or how many of a colour (answers ``0``–``4``);
* ``relation``: is object A left of / right of / above / below object B (yes/no, balanced);
* ``exist``: is there a <colour> <shape> (yes/no, balanced; "no" names a combination absent from the scene).

:func:`make_dialogues` draws 1–``max_turns`` questions about one scene as a dialogue (multi-turn
training data); :func:`make_questions` draws single questions for evaluation, each tagged with its type
and whether its phrasing was held out. :func:`normalise_answer` maps answers to a canonical form
(lower case, no punctuation, number words → digits) for exact-match scoring.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Sequence

import numpy as np

from experiments.data.shapesworld import COLOURS, NUMBER_WORDS, SHAPES

QUESTION_TYPES = ("colour", "shape", "count", "relation", "exist")
_RELATIONS = {"left_of": "left of", "right_of": "right of", "above": "above", "below": "below"}
_REVERSE = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above"}

#: phrasings per type; the last one of each list is held out of training (HELD_OUT_PHRASINGS)
PHRASINGS: dict[str, list[str]] = {
    "colour": ["What colour is the {shape}?", "Which colour does the {shape} have?", "The {shape} is what colour?",
               "Tell me the colour of the {shape}."],
    "shape": ["What shape is the {colour} object?", "Which shape is {colour}?", "What is the {colour} shape?",
              "Name the shape of the {colour} object."],
    "count": ["How many objects are there?", "How many shapes are in the picture?", "Count the objects.",
              "What is the number of objects in the image?"],
    "count_colour": ["How many {colour} objects are there?", "How many shapes are {colour}?",
                     "Count the {colour} objects.", "What is the number of {colour} shapes?"],
    "relation": ["Is the {a} {rel} the {b}?", "Is the {a} located {rel} the {b}?", "Does the {a} sit {rel} the {b}?",
                 "Would you say the {a} is {rel} the {b}?"],
    "exist": ["Is there a {colour} {shape}?", "Does the image contain a {colour} {shape}?",
              "Can you see a {colour} {shape}?", "Is a {colour} {shape} present in the picture?"],
}
HELD_OUT_PHRASINGS = {k: v[-1] for k, v in PHRASINGS.items()}


@dataclass(frozen=True)
class Question:
    """One question about scene ``scene`` (its row in the split), with its canonical answer."""

    scene: int
    type: str
    question: str
    answer: str
    held_out_phrasing: bool


def normalise_answer(text: str) -> str:
    """Lower case, first line, punctuation dropped, articles dropped, number words → digits, grey → gray."""
    t = text.strip().lower().split("\n")[0]
    t = re.sub(r"[^a-z0-9 ]+", " ", t)
    words = [w for w in t.split() if w not in ("a", "an", "the", "it", "is", "its")]
    words = [str(NUMBER_WORDS.index(w)) if w in NUMBER_WORDS else w for w in words]
    return " ".join(words)


def _name(obj: dict) -> str:
    return f"{obj['colour']} {obj['shape']}"


def _uniquely_named(objs: list[dict], attr: str, rng: np.random.Generator) -> dict | None:
    """A random object whose ``attr`` no other object shares (so ``attr`` names it), or None."""
    values = [o[attr] for o in objs]
    unique = [o for o in objs if values.count(o[attr]) == 1]
    return unique[int(rng.integers(len(unique)))] if unique else None


def _draw(scene: dict, kind: str, rng: np.random.Generator, phrasings: Sequence[str]) -> tuple[str, str] | None:
    """One (question, answer) of ``kind`` about ``scene``, or None if the scene cannot pose it."""
    objs = scene["objects"]
    phr = phrasings[int(rng.integers(len(phrasings)))]
    if kind in ("colour", "shape"):  # ask for one attribute of the object named by the other
        named = "shape" if kind == "colour" else "colour"
        o = _uniquely_named(objs, named, rng)
        return None if o is None else (phr.format(**{named: o[named]}), o[kind])
    if kind == "count":
        return phr, str(len(objs))
    if kind == "count_colour":
        present = [o["colour"] for o in objs]
        colour = present[int(rng.integers(len(present)))] if rng.random() < 0.7 else COLOURS[int(rng.integers(6))]
        return phr.format(colour=colour), str(present.count(colour))
    if kind == "relation":
        pairs = [(i, r, j) for i, r, j in scene["relations"] if r in _RELATIONS]
        if not pairs:
            return None
        i, r, j = pairs[int(rng.integers(len(pairs)))]
        yes = rng.random() < 0.5
        asked = r if yes else _REVERSE[r]  # the reverse relation is false (REL_MARGIN keeps it clearly false)
        return phr.format(a=_name(objs[i]), rel=_RELATIONS[asked], b=_name(objs[j])), "yes" if yes else "no"
    if kind == "exist":
        present = {(o["colour"], o["shape"]) for o in objs}
        if rng.random() < 0.5:
            c, s = sorted(present)[int(rng.integers(len(present)))]
            return phr.format(colour=c, shape=s), "yes"
        while True:
            c, s = COLOURS[int(rng.integers(6))], SHAPES[int(rng.integers(6))]
            if (c, s) not in present:
                return phr.format(colour=c, shape=s), "no"
    raise ValueError(f"unknown question kind {kind!r}")


def _kind_of(question_type: str, rng: np.random.Generator) -> str:
    return ("count" if rng.random() < 0.5 else "count_colour") if question_type == "count" else question_type


def _phrasings(kind: str, held_out: bool) -> list[str]:
    return [HELD_OUT_PHRASINGS[kind]] if held_out else PHRASINGS[kind][:-1]


def make_dialogues(scenes: Sequence[dict], n_per_scene: int = 2, max_turns: int = 3, seed: int = 0
                   ) -> tuple[list[list[tuple[str, str]]], np.ndarray]:
    """Training dialogues: ``n_per_scene`` per scene, each of 1–``max_turns`` questions of distinct types
    (seen phrasings only). Returns the dialogues and the scene row of each."""
    rng = np.random.default_rng(seed)
    dialogues, rows = [], []
    for row, scene in enumerate(scenes):
        for _ in range(n_per_scene):
            n_turns = int(rng.integers(1, max_turns + 1))
            turns = []
            for qtype in rng.permutation(QUESTION_TYPES):
                kind = _kind_of(str(qtype), rng)
                qa = _draw(scene, kind, rng, _phrasings(kind, False))
                if qa is not None:
                    turns.append(qa)
                if len(turns) == n_turns:
                    break
            dialogues.append(turns)
            rows.append(row)
    return dialogues, np.asarray(rows, dtype=np.int64)


def make_questions(scenes: Sequence[dict], per_type: int = 1, held_out_phrasing: bool = False, seed: int = 0
                   ) -> list[Question]:
    """Evaluation questions: up to ``per_type`` of each type per scene, with seen or held-out phrasings."""
    rng = np.random.default_rng(seed)
    out = []
    for row, scene in enumerate(scenes):
        for qtype in QUESTION_TYPES:
            for _ in range(per_type):
                kind = _kind_of(qtype, rng)
                qa = _draw(scene, kind, rng, _phrasings(kind, held_out_phrasing))
                if qa is not None:
                    out.append(Question(row, qtype, qa[0], normalise_answer(qa[1]), held_out_phrasing))
    return out


def majority_answers(dialogues: Sequence[Sequence[tuple[str, str]]]) -> dict[str, str]:
    """The most frequent (normalised) training answer per question type: the prior-only control."""
    counts: dict[str, dict[str, int]] = {}
    for d in dialogues:
        for q, a in d:
            t = question_type(q)
            counts.setdefault(t, {})
            counts[t][normalise_answer(a)] = counts[t].get(normalise_answer(a), 0) + 1
    return {t: max(c, key=c.get) for t, c in counts.items()}


def question_type(question: str) -> str:
    """The type of a question generated here (by its phrasing)."""
    for kind, templates in PHRASINGS.items():
        for t in templates:
            pattern = "^" + re.sub(r"\\\{\w+\\\}", ".+", re.escape(t)) + "$"
            if re.match(pattern, question):
                return "count" if kind == "count_colour" else kind
    raise ValueError(f"not a generated question: {question!r}")
