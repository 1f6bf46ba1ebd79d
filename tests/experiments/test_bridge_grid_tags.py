"""The grid_tags connector through the bridge runner (tiny Llama): the full (unpooled) grid at an encoder size above
the scenes' (``vision.options.image_size``), tag groups with synonyms from the config, seeding from the run's seed
map (its scale calibration skipped: tag connectors do not use it), the LM's matmuls in bf16 (``llm.linears_bf16``),
stage 2, and ``alignfuse ask`` on the saved model (groups, encoder size and matmul precision travel with it)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.bridge.evaluate import layout_metrics
from experiments.runners import bridge
from tests.experiments.test_bridge_runner import TINY

GROUPS = [["red|crimson|scarlet", "green|emerald", "blue|cobalt"], ["circle|disc", "square", "star"]]


@pytest.mark.slow
def test_grid_tags_seeded_through_the_runner_and_loaded_by_ask(tmp_path):
    from align.llm import LowPrecisionLinear
    from experiments.ask import load_bridge

    raw = {**TINY, "llm": {**TINY["llm"], "linears_bf16": True}, "vision": {"tokens": None, "options": {"image_size": 128}},  # 64 px scenes, a 4x4 grid
           "connectors": ["grid_tags"], "connector_options": {"grid_tags": {"vocabulary": GROUPS, "cells": 3,
                                                                            "threshold": -100.0}},
           "stage2": {**TINY["stage2"], "connector": "grid_tags"},
           "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}
    results = bridge.run(bridge.load(raw))
    seeded = results["runs"]["grid_tags/seeded"]
    assert "ridge_alpha" in seeded["seed_info"] and seeded["seed_info"]["mean_cells_shown"] >= 1.0
    assert results["setup"]["seed_map"]["calibration"]["linear_nll_by_scale"] == {}  # not needed: skipped
    assert results["vqa"]["connector"] == "grid_tags" and results["setup"]["image_tokens"] == [16, 1280]
    assert 0.0 <= seeded["layout_colour_accuracy"] <= 1.0 and 1.0 <= seeded["layout_cells_per_image"] <= 3.0
    model = load_bridge(tmp_path / "out")
    conn = model.connector
    assert conn.name == "grid_tags" and conn.groups == GROUPS and conn.words[:3] == ["red", "green", "blue"]
    assert any(isinstance(m, LowPrecisionLinear) for m in model.llm.modules())
    layout = conn.layout(torch.randn(2, 16, conn.vision_dim))  # the threshold shows every picked cell
    cells = [c.split() for c in layout[0].split("; ")]
    assert 1 <= len(cells) <= 3 and all(c[2] in ("red", "green", "blue") and c[3] in ("circle", "square", "star")
                                   for c in cells)
    images = np.zeros((2, 64, 64, 3), dtype=np.uint8)  # the loaded tower encodes at 128 px: 16 tokens
    assert model.image_features(images).shape == (2, 16, conn.vision_dim)
    assert len(model.chat(images, "What colour is the star?", max_new_tokens=2)) == 2


def test_layout_metrics_match_cells_to_the_nearest_object():
    scenes = [{"objects": [{"x": 0.1, "y": 0.1, "colour": "red", "shape": "circle"},
                           {"x": 0.9, "y": 0.8, "colour": "blue", "shape": "star"}]},
              {"objects": [{"x": 0.5, "y": 0.5, "colour": "green", "shape": "square"}]}]
    layouts = ["1 1 red circle; 4 4 cobalt square; red circle left above cobalt square",  # 4x4 grid; "cobalt" names
               # blue, the star is called a square; the relation phrase is not a cell
               "2 2 green square; 3 3 green square"]  # one object shown twice
    m = layout_metrics(layouts, scenes, side=4)
    assert m == {"layout_count_exact": 0.5, "layout_cells_per_image": 2.0, "layout_colour_accuracy": 1.0,
                 "layout_shape_accuracy": 0.75}
    with pytest.raises(ValueError, match="1 layouts but 2 scenes"):
        layout_metrics(layouts[:1], scenes, side=4)
