"""The word_tags connector through the bridge runner (tiny Llama): seeded from the run's seed map, stage 2, a step-0
evaluation without controls (``eval.step0_controls: false``), and ``alignfuse ask`` on the saved model (the tags'
vocabulary travels in the connector's config)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from experiments.runners import bridge
from tests.experiments.test_bridge_runner import TINY


@pytest.mark.slow
def test_word_tags_seeded_through_the_runner_and_loaded_by_ask(tmp_path):
    from experiments.ask import load_bridge

    raw = {**TINY, "connectors": ["word_tags"], "connector_options": {"word_tags": {"slots": 3}},
           "stage2": {**TINY["stage2"], "connector": "word_tags"},
           "eval": {**TINY["eval"], "step0_controls": False},  # step 0: caption NLL and generated captions only
           "out_dir": str(tmp_path / "out"), "cache_dir": str(tmp_path / "cache")}
    results = bridge.run(bridge.load(raw))
    seeded = results["runs"]["word_tags/seeded"]
    assert "ridge_alpha" in seeded["seed_info"] and seeded["seed_info"]["mean_tags_per_image"] >= 1.0
    assert results["vqa"]["connector"] == "word_tags"
    assert "attribute_accuracy_step0" in seeded and "caption_nll_step0" in seeded
    assert "hard_negative_ranking_step0" not in seeded and "gain_vs_shuffled_step0" not in seeded
    assert "hard_negative_ranking" in seeded and "gain_vs_shuffled" in seeded  # the final evaluation has them
    assert "| word_tags/seeded | " in bridge.format_results(results)
    model = load_bridge(tmp_path / "out")
    conn = model.connector
    assert conn.name == "word_tags" and conn.slots == 3 and conn.words and "a" not in conn.words
    x = torch.randn(2, 4, conn.vision_dim)
    assert conn(x).shape == (2, 3, conn.lm_dim)
    images = np.zeros((2, 64, 64, 3), dtype=np.uint8)  # the loaded model runs its frozen vision encoder itself
    assert len(model.chat(images, "What colour is the star?", max_new_tokens=2)) == 2
