"""Tests of the word_tags connector (align.connector_tags): tags, straight-through gradient, seeding, round trip."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from align.connector_tags import content_vocabulary
from align.connectors import CONNECTORS, build_connector, connector_from_config
from align.llm import tiny_llm
from align.mllm import MultimodalLM
from align.seeding import AffineMap, llm_text_embeddings

D_V = 6
WORDS = "a the is red blue green circle square star".split()
CAPTIONS = ["a red circle", "the blue square", "a green star", "a red square is the star"]


@pytest.fixture(scope="module")
def lm():
    return tiny_llm(WORDS, seed=0)


def _bound(lm, **kw):
    torch.manual_seed(0)
    c = build_connector("word_tags", D_V, 64, **kw)
    c.bind(*lm, CAPTIONS)
    return c


def test_registered_vocabulary_without_stop_words_and_clear_errors(lm):
    assert "word_tags" in CONNECTORS.names()
    assert content_vocabulary(CAPTIONS) == ["blue", "circle", "green", "red", "square", "star"]
    c = build_connector("word_tags", D_V, 64)
    with pytest.raises(RuntimeError, match="no vocabulary yet"):
        c(torch.zeros(1, 2, D_V))
    for bad in ({"slots": 0}, {"temperature": 0.0}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            build_connector("word_tags", D_V, 64, **bad)


def test_tokens_are_the_top_words_embeddings_repeated_to_fill_the_slots(lm):
    c = _bound(lm, slots=5, threshold=0.5)
    e = torch.as_tensor(llm_text_embeddings(*lm, c.words), dtype=torch.float32)
    assert torch.allclose(c.embeddings, e)
    with torch.no_grad():  # scores = the first 6 feature dims (one per word), bias 0
        c.score.weight.zero_()
        c.score.weight[:, :6] = torch.eye(6)
        c.score.bias.zero_()
    x = torch.zeros(2, 3, D_V)
    x[0, :, 3] = 1.0  # "red" only
    x[1, :, 1], x[1, :, 4] = 0.9, 1.0  # "square" > "circle", both above the threshold
    assert c.tag_words(x) == [["red"], ["square", "circle"]]
    out = c(x)
    assert out.shape == (2, 5, 64)
    red, sq, ci = (c.words.index(w) for w in ("red", "square", "circle"))
    assert torch.allclose(out[0], e[red].expand(5, -1), atol=1e-6)
    assert torch.allclose(out[1], e[[sq, ci, sq, ci, sq]], atol=1e-6)


def test_gradient_reaches_the_scorer_straight_through(lm):
    c = _bound(lm)
    c(torch.randn(3, 2, D_V)).pow(2).sum().backward()
    assert c.score.weight.grad is not None and c.score.weight.grad.abs().sum() > 0


def test_seed_regresses_caption_words_on_the_aligned_space(lm):
    c = _bound(lm, slots=2, threshold=0.5)
    rng = np.random.default_rng(0)
    n = 60
    which = rng.integers(0, 2, n)  # image kind 0 → "a red circle", 1 → "the blue square"
    x = rng.normal(size=(n, 2, D_V)).astype(np.float32) * 0.1
    x[:, :, 0] += np.where(which == 0, 1.0, -1.0)[:, None]
    texts = [[CAPTIONS[k]] for k in which]
    shared = AffineMap(np.eye(D_V)[:, :3], np.zeros(3))  # the "aligned space": the first 3 dims
    info = c.seed(AffineMap(np.zeros((D_V, 64)), np.zeros(64)), image_to_shared=shared, features=x, texts=texts)
    assert info["mean_tags_per_image"] == pytest.approx(2.0)
    tags = c.tag_words(torch.from_numpy(x))
    assert all(set(t) == ({"red", "circle"} if k == 0 else {"blue", "square"}) for t, k in zip(tags, which))
    with pytest.raises(ValueError, match="captions of each sample image"):
        c.seed(AffineMap(np.zeros((D_V, 64)), np.zeros(64)), image_to_shared=shared, features=x)


def test_round_trip_and_training_inside_a_multimodal_lm(lm):
    c = _bound(lm)
    rebuilt = connector_from_config(c.config)
    rebuilt.load_state_dict(c.state_dict())
    x = torch.randn(2, 3, D_V)
    assert torch.equal(rebuilt(x), c(x))
    model = MultimodalLM(*lm, c, prompt="caption:", style_tokens=2)
    model.loss({"image": torch.randn(4, 3, D_V), "text": CAPTIONS}).backward()
    assert c.score.weight.grad is not None and model.style.grad is not None
    assert all(p.grad is None for p in model.llm.parameters())
