"""Tests of the grid_tags connector (align.connector_grid): layout tokens, groups and synonyms, straight-through
gradient, per-cell seeding, round trip inside a multimodal LM."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from align.connectors import CONNECTORS, build_connector, connector_from_config
from align.llm import tiny_llm
from align.mllm import MultimodalLM
from align.seeding import AffineMap, llm_text_embeddings

D_V = 6
WORDS = "a the is red blue green circle square star cobalt none 1 2 3 4 5 6 7 8 9 left right above below level".split()
CAPTIONS = ["a red circle", "the blue square", "a green star", "a cobalt square is the star"]
GROUPS = [["red", "blue|cobalt", "green"], ["circle", "square", "star"]]


@pytest.fixture(scope="module")
def lm():
    return tiny_llm(WORDS, seed=0)


def _bound(lm, **kw):
    torch.manual_seed(0)
    c = build_connector("grid_tags", D_V, 64, **kw)
    c.bind(*lm, CAPTIONS)
    return c


def _identity_scores(c):
    with torch.no_grad():  # entry scores = the first 6 feature dims, bias 0
        c.score.weight.zero_()
        c.score.weight[:, :6] = torch.eye(6)
        c.score.bias.zero_()


def test_registered_with_groups_synonyms_and_clear_errors(lm):
    assert "grid_tags" in CONNECTORS.names()
    c = _bound(lm, vocabulary=GROUPS)
    assert c.words == ["red", "blue", "green", "circle", "square", "star"] and c.tags_per_cell == 2
    assert c.config["vocabulary"] == GROUPS
    assert c.presence([["a cobalt star"], ["the red circle", "a green star"]]).tolist() == [
        [0, 1, 0, 0, 0, 1], [1, 0, 1, 1, 0, 1]]
    assert _bound(lm).words == ["blue", "circle", "cobalt", "green", "red", "square", "star"]  # content words
    with pytest.raises(ValueError, match="square grid"):
        c(torch.zeros(1, 3, D_V))
    for bad in ({"cells": 0}, {"suppress": 0}, {"temperature": 0.0}, {"vocabulary": [["red"], []]}):
        with pytest.raises(ValueError, match="suppress|cells|temperature|vocabulary"):
            build_connector("grid_tags", D_V, 64, **bad)
    with pytest.raises(RuntimeError, match="no vocabulary yet"):
        build_connector("grid_tags", D_V, 64)(torch.zeros(1, 4, D_V))


def test_tokens_are_coordinates_and_tags_of_cells_picked_by_suppression(lm):
    c = _bound(lm, vocabulary=GROUPS, cells=4, threshold=0.5, suppress=2)
    _identity_scores(c)
    e = dict(zip(["none", "1", "4", "blue", "square", "green", "star", "red", "circle"], torch.as_tensor(
        llm_text_embeddings(*lm, ["none", "1", "4", "blue", "square", "green", "star", "red", "circle"]),
        dtype=torch.float32)))
    x = torch.zeros(1, 16, D_V)  # a 4x4 grid, cell = 4 * row + column
    x[0, 15, 0], x[0, 15, 3] = 1.0, 0.9  # bottom right: red circle
    x[0, 14, 0] = 0.7  # its neighbour: dropped
    x[0, 13, 0] = 0.9  # 2 cells away, also red: dropped (shares a tag)
    x[0, 12, 2], x[0, 12, 5] = 0.95, 0.6  # 3 cells away: green star, kept
    x[0, 3, 1], x[0, 3, 4] = 0.8, 0.1  # top right: blue (square below the threshold, still its best shape)
    x[0, 4, 5] = 0.3  # below the threshold: not shown
    assert c.layout(x) == ["4 1 blue square; 1 4 green star; 4 4 red circle"]
    out = c(x)
    assert out.shape == (1, 4 * 4, 64) and c.num_tokens(16) == 16
    words = "4 1 blue square 1 4 green star 4 4 red circle none none none none".split()
    assert torch.allclose(out[0], torch.stack([e[w] for w in words]), atol=1e-6)
    near = torch.zeros(1, 16, D_V)
    near[0, 15, 0], near[0, 15, 3] = 1.0, 0.9  # a red circle ...
    near[0, 13, 1], near[0, 13, 4] = 0.8, 0.9  # ... and 2 cells away a blue square: no shared tag, both kept
    assert c.layout(near) == ["2 4 blue square; 4 4 red circle"]
    near[0, 13, 0] = 0.85  # now the square's best colour is red too: dropped
    assert c.layout(near) == ["4 4 red circle"]
    single = _bound(lm, cells=1, per_group=2, threshold=0.1)  # one group: the 2 best words per cell
    with torch.no_grad():
        single.score.weight.zero_()
        single.score.bias.zero_()
        single.score.weight[single.words.index("star"), 0] = 1.0
        single.score.weight[single.words.index("green"), 1] = 1.0
    x = torch.zeros(1, 4, D_V)
    x[0, 2, 0], x[0, 2, 1] = 1.0, 0.5
    assert single.layout(x) == ["1 2 star green"] and single(x).shape == (1, 4, 64)


def test_relation_phrases_for_every_pair_of_shown_cells(lm):
    c = _bound(lm, vocabulary=GROUPS, cells=4, threshold=0.5, suppress=2, relations=True)
    _identity_scores(c)
    x = torch.zeros(1, 16, D_V)  # the three objects of the test above
    x[0, 15, 0], x[0, 15, 3] = 1.0, 0.9  # 4 4 red circle
    x[0, 12, 2], x[0, 12, 5] = 0.95, 0.6  # 1 4 green star
    x[0, 3, 1], x[0, 3, 4] = 0.8, 0.1  # 4 1 blue square
    assert c.layout(x) == ["4 1 blue square; 1 4 green star; 4 4 red circle; blue square right above green star; "
                           "blue square level above red circle; green star left level red circle"]
    out = c(x)
    assert out.shape == (1, 16 + 6 * 6, 64) and c.num_tokens(16) == 52
    words = ("4 1 blue square 1 4 green star 4 4 red circle none none none none "
             "blue square right above green star blue square level above red circle "
             "none none none none none none green star left level red circle").split() + ["none"] * 12
    e = torch.as_tensor(llm_text_embeddings(*lm, words), dtype=torch.float32)
    assert torch.allclose(out[0], e, atol=1e-6)
    rebuilt = connector_from_config(c.config)  # the relation words travel in the state dict
    rebuilt.load_state_dict(c.state_dict())
    assert torch.equal(rebuilt(x), out)
    c.score.weight.requires_grad_(True)
    c(x).pow(2).sum().backward()  # the phrases' tags pass the straight-through gradient too
    assert c.score.weight.grad.abs().sum() > 0


def test_gradient_reaches_the_scorer_straight_through(lm):
    c = _bound(lm, vocabulary=GROUPS, threshold=-10.0)  # every picked cell is shown
    c(torch.randn(3, 9, D_V)).pow(2).sum().backward()
    assert c.score.weight.grad is not None and c.score.weight.grad.abs().sum() > 0


def test_seed_regresses_presence_and_localises_it_per_cell(lm):
    c = _bound(lm, vocabulary=GROUPS, cells=1, threshold=0.5)  # 2x2 grids: one object each
    rng = np.random.default_rng(0)
    n = 80
    which, where = rng.integers(0, 2, n), rng.integers(0, 4, n)  # kind 0 → red circle, 1 → cobalt square
    x = rng.normal(size=(n, 4, D_V)).astype(np.float32) * 0.05
    x[np.arange(n), where, 0] += np.where(which == 0, 4.0, -4.0)  # the object lives in one cell of four
    texts = [["a red circle"] if k == 0 else ["a cobalt square"] for k in which]
    shared = AffineMap(np.eye(D_V)[:, :3], np.zeros(3))
    info = c.seed(AffineMap(np.zeros((D_V, 64)), np.zeros(64)), image_to_shared=shared, features=x, texts=texts)
    assert info["mean_cells_shown"] == 1.0
    layouts = c.layout(torch.from_numpy(x))
    for text, k, w in zip(layouts, which, where):
        assert text == f"{w % 2 + 1} {w // 2 + 1} " + ("red circle" if k == 0 else "blue square")
    with pytest.raises(ValueError, match="captions of each sample image"):
        c.seed(AffineMap(np.zeros((D_V, 64)), np.zeros(64)), image_to_shared=shared, features=x)


def test_round_trip_and_training_inside_a_multimodal_lm(lm):
    c = _bound(lm, vocabulary=GROUPS, threshold=-10.0)
    rebuilt = connector_from_config(c.config)
    rebuilt.load_state_dict(c.state_dict())
    x = torch.randn(2, 4, D_V)
    assert torch.equal(rebuilt(x), c(x)) and rebuilt.layout(x) == c.layout(x)
    model = MultimodalLM(*lm, c, prompt="caption:", style_tokens=2)
    model.loss({"image": torch.randn(4, 4, D_V), "text": CAPTIONS}).backward()
    assert c.score.weight.grad is not None and model.style.grad is not None
    assert all(p.grad is None for p in model.llm.parameters())
