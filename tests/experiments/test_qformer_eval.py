"""The Q-Former's evaluation in the align runner (re-ranking, ITM hard negatives, report table) and its ITM data."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from align.base import build_aligner

TINY = dict(image_dim=8, num_queries=2, num_layers=2, embed_dim=16, init="random", hidden=32, heads=4, ffn_dim=64,
            dropout=0.0, max_text_len=16, rerank_k=3)
CAPS = ["a red circle", "a blue square", "two small triangles", "a large purple cross", "a green star",
        "an orange square", "a blue circle", "a yellow diamond"]


class _Views:
    """What evaluate_aligner reads of PairViews: 4 test images (grids), 2 captions each, 1 hard negative each."""

    def __init__(self):
        self.grid = np.random.default_rng(0).normal(size=(4, 6, 8)).astype(np.float16)

    def image(self, kind, split):
        assert kind == "grid" and split == "test"
        return self.grid

    def split_text(self, kind, split):
        return list(CAPS), np.repeat(np.arange(4), 2)

    def text(self, kind, texts, key):
        return list(texts)

    def hard_negatives(self, split):
        return [CAPS[0], CAPS[2], CAPS[4], CAPS[6]], ["a red square", "two large triangles", "a green cross",
                                                     "a red circle"], np.arange(4)


def test_evaluate_aligner_adds_reranking_and_itm_hard_negatives(one_thread):
    from experiments.align_eval import evaluate_aligner
    from experiments.reports.align import format_results

    torch.manual_seed(0)
    m = build_aligner("qformer", **TINY)
    out = evaluate_aligner(m, m.inputs, _Views())
    mt = out["matching"]
    assert mt["k"] == 3 and mt["hard_negative_pairs"] == 4
    for s in ("itc", "itm_rerank"):
        assert 0 <= mt[s]["rsum"] <= 600 and set(mt[s]) >= {"image_to_text", "text_to_image"}
    assert 0 <= mt["hard_negative_accuracy_itm"] <= 100
    res = {"aligners": {"qformer": {**out, "params_trained": 1, "train_seconds": 1.0, "rsum_std": None,
                                    "train_seconds_std": None, "hard_negative_accuracy_std": None,
                                    **{d: {**out[d], **{f"R@{k}_std": None for k in (1, 5, 10)}}
                                       for d in ("image_to_text", "text_to_image")}}},
           "seeds": [0]}
    text = format_results(res)
    assert "rsum re-ranked" in text and "hard-neg acc ITM %" in text
    row = [line for line in text.splitlines() if line.startswith("| qformer | 3 |")]
    assert row and f"{mt['itm_rerank']['rsum']:.1f}" in row[0]


def test_models_without_itm_get_no_matching_table():
    from experiments.reports.align import matching_table

    assert matching_table({"aligners": {"clip": {"rsum": 1.0}}}) == ""


@pytest.fixture(scope="module")
def small_world():
    from experiments.data import load_shapesworld

    return load_shapesworld(n_scenes=40, image_size=32, seed=3, holdout=[], use_cache=False)


def test_training_negatives_are_false_edits_of_true_captions(small_world):
    from experiments.data.shapesworld import holds
    from experiments.qformer_data import training_negatives

    rows = np.asarray(small_world.splits["train"])[:10]
    negs, srcs = training_negatives(small_world, rows, per_image=6)
    assert len(negs) == len(srcs) == 10
    for r, ns, ss in zip(rows, negs, srcs):
        assert 1 <= len(ns) == len(ss) <= 6 and len(set(ns)) == len(ns)
        assert not set(ns) & set(small_world.captions[r])
        assert not set(ns) & set(small_world.hard_negatives[r])  # not the data set's own hard negatives
        assert all(n != s for n, s in zip(ns, ss))
    assert training_negatives(small_world, rows, 6) == (negs, srcs)  # seeded


def test_bundle_round_trip(small_world, tmp_path):
    from experiments.qformer_data import load_bundle, save_bundle

    grid = np.random.default_rng(0).normal(size=(len(small_world), 4, 8)).astype(np.float32)
    save_bundle(tmp_path / "b.npz", small_world, grid, per_image=3)
    data, g = load_bundle(tmp_path / "b.npz")
    np.testing.assert_allclose(g, grid.astype(np.float16))
    assert data.captions == small_world.captions and data.hard_negatives == small_world.hard_negatives
    tr = small_world.splits["train"]
    np.testing.assert_array_equal(data.splits["train"], tr)
    assert data.train_negatives[tr[0]] and all(not data.train_negatives[i] for i in small_world.splits["test"])
    np.testing.assert_array_equal(data.labels["shape_colour"], small_world.labels["shape_colour"])


def test_ablation_cli_builds_the_asked_cross_attention_layers(small_world, tmp_path):
    """``--cross-every 1`` puts cross-attention in every layer (the default 2: layers 0, 2, ...)."""
    from experiments.qformer_data import save_bundle
    from experiments.qformer_eval import main

    grid = np.random.default_rng(0).normal(size=(len(small_world), 4, 8)).astype(np.float32)
    save_bundle(tmp_path / "b.npz", small_world, grid, per_image=2)
    for every, expected in ((1, {0, 1}), (2, {0})):
        out = tmp_path / f"every{every}"
        main(["--bundle", str(tmp_path / "b.npz"), "--variants", "itc+itm+neg", "--steps", "1", "--batch-size", "4",
              "--layers", "2", "--queries", "2", "--cross-every", str(every), "--max-eval-images", "4",
              "--device", "cpu", "--save", "--out", str(out)])
        state = torch.load(out / "itc+itm+neg-seed0.pt", weights_only=True)
        assert {int(k.split(".")[2]) for k in state if ".crossattention." in k} == expected
        fit = json.loads((out / "results.json").read_text())["runs"][0]["hard_negatives_train"]
        assert fit["n_pairs"] > 0 and 0 <= fit["itm"] <= 100  # the training negatives' fit is reported
