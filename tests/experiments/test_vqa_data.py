"""Tests of experiments.data.vqa: answers follow the scene metadata, balance, held-out phrasings, normalisation."""
from __future__ import annotations

import numpy as np
import pytest

from experiments.data.shapesworld import SHAPES, load_shapesworld
from experiments.data.vqa import (HELD_OUT_PHRASINGS, PHRASINGS, QUESTION_TYPES, majority_answers, make_dialogues,
                                  make_questions, normalise_answer, question_type)


@pytest.fixture(scope="module")
def scenes(tmp_path_factory):
    return load_shapesworld(n_scenes=120, image_size=32, seed=0, cache_dir=tmp_path_factory.mktemp("sw")).scenes


def test_answers_follow_the_scene(scenes):
    for q in make_questions(scenes, per_type=2, seed=3):
        objs = scenes[q.scene]["objects"]
        if q.type == "colour":
            (shape,) = [s for s in SHAPES if s in q.question]
            assert [o["colour"] for o in objs if o["shape"] == shape] == [q.answer]
        elif q.type == "shape":
            assert q.answer in {o["shape"] for o in objs}
        elif q.type == "count" and "objects are there" in q.question and q.question.count(" ") == 4:
            assert q.answer == str(len(objs))
        elif q.type == "exist":
            names = {f"{o['colour']} {o['shape']}" for o in objs}
            assert (q.answer == "yes") == any(n in q.question for n in names)


def test_yes_no_balanced_and_every_type_present(scenes):
    qs = make_questions(scenes, per_type=2, seed=0)
    assert {q.type for q in qs} == set(QUESTION_TYPES)
    for t in ("relation", "exist"):
        yes = np.mean([q.answer == "yes" for q in qs if q.type == t])
        assert 0.35 < yes < 0.65, (t, yes)


def test_held_out_phrasings_never_in_training(scenes):
    dialogues, rows = make_dialogues(scenes, n_per_scene=3, max_turns=3, seed=0)
    assert len(dialogues) == len(rows) == 3 * len(scenes) and rows.max() == len(scenes) - 1
    assert max(len(d) for d in dialogues) == 3 and min(len(d) for d in dialogues) >= 1
    held = {t.split("{")[0] for t in HELD_OUT_PHRASINGS.values()}
    for d in dialogues:
        for q, _ in d:
            assert not any(q.startswith(h) for h in held), q
    test = make_questions(scenes, held_out_phrasing=True, seed=1)
    assert all(q.held_out_phrasing for q in test)
    assert all(any(q.question.startswith(h) for h in held) for q in test)
    assert set(majority_answers(dialogues)) == set(QUESTION_TYPES)


def test_normalise_and_question_type():
    assert normalise_answer(" Three.") == "3" and normalise_answer("The RED one!") == "red 1"
    assert normalise_answer("yes<|im_end|>") == "yes im end" != "yes"
    assert normalise_answer("Yes.\nmore") == "yes"
    for kind, templates in PHRASINGS.items():
        for t in templates:
            q = t.format(shape="star", colour="red", a="red star", b="blue circle", rel="left of")
            assert question_type(q) == ("count" if kind == "count_colour" else kind)
    with pytest.raises(ValueError, match="not a generated question"):
        question_type("Why?")
