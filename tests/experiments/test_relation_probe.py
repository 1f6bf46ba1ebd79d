"""The relation probe: ground-truth layouts as text, LoRA on relation questions, yes/no accuracy (tiny Llama)."""
import math

import torch

from align.llm import tiny_llm
from experiments.bridge.relation_probe import layout_text, object_cells, relation_questions, run_probe
from experiments.data.shapesworld import COLOURS, SHAPES, load_shapesworld
from experiments.data.vqa import PHRASINGS

SCENE = {"objects": [{"x": 0.8, "y": 0.6, "colour": "blue", "shape": "star"},
                     {"x": 0.3, "y": 0.1, "colour": "red", "shape": "square"}]}


def test_layout_digits_is_grid_tags_format_in_raster_order():
    assert object_cells(SCENE) == [(1, 3, "red", "square"), (5, 7, "blue", "star")]
    assert layout_text(SCENE, "digits") == "3 1 red square 7 5 blue star " + " ".join(["none"] * 8)


def test_layout_phrases_state_both_directions_on_both_axes():
    phrases = layout_text(SCENE, "phrases").split("; ")
    assert sorted(phrases) == sorted(["red square left of blue star", "red square above blue star",
                                      "blue star right of red square", "blue star below red square"])


def test_relation_questions_are_balanced_and_about_the_given_rows(tmp_path):
    sw = load_shapesworld(n_scenes=60, image_size=32, seed=0, cache_dir=tmp_path)
    rows = sw.splits["train"]
    qs = relation_questions(sw.scenes, rows, 200, seed=0)
    assert {r for r, _, _ in qs} <= set(map(int, rows))
    assert 0.35 < sum(a == "yes" for _, _, a in qs) / len(qs) < 0.65


def test_probe_trains_lora_only_and_leaves_the_base_model_unchanged(tmp_path):
    sw = load_shapesworld(n_scenes=60, image_size=32, seed=0, cache_dir=tmp_path)
    words = [*COLOURS, *SHAPES, *map(str, range(10)), "none", "yes", "no", "left", "right", "of", "above",
             "below", *" ".join(PHRASINGS["relation"]).replace("{a}", "").replace("{b}", "").replace("{rel}", "").split()]
    model, tok = tiny_llm(words)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = run_probe(model, tok, sw.scenes, sw.splits["train"], sw.splits["test"], "digits", steps=4, batch_size=4,
                    n_test=20)
    assert 0.0 <= out["accuracy"] <= 1.0 and 0.0 <= out["accuracy_shuffled_layout"] <= 1.0
    assert math.isfinite(out["loss_first_25"]) and out["n_test"] == 20
    after = model.state_dict()
    assert set(after) == set(before) and all(torch.equal(before[k], after[k]) for k in before)
    assert not any(p.requires_grad for p in model.parameters())
