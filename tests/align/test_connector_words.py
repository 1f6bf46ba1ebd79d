"""Tests of the word_mixture connector (align.connector_words), the bag-of-words text view
(align.seeding.bag_of_words) and the style-token position of MultimodalLM."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from align.connectors import CONNECTORS, build_connector, connector_from_config
from align.llm import tiny_llm
from align.mllm import MultimodalLM
from align.seeding import AffineMap, bag_of_words, caption_vocabulary, llm_text_embeddings

D_V = 6
WORDS = "a the red blue green circle square star".split()
CAPTIONS = ["a red circle", "the blue square", "a green star", "a red square"]


@pytest.fixture(scope="module")
def lm():
    return tiny_llm(WORDS, seed=0)


def _bound(lm):
    torch.manual_seed(0)
    c = build_connector("word_mixture", D_V, 64)
    c.bind(*lm, CAPTIONS)
    return c


def test_registered_and_needs_a_vocabulary(lm):
    assert "word_mixture" in CONNECTORS.names()
    c = build_connector("word_mixture", D_V, 64)
    with pytest.raises(RuntimeError, match="no vocabulary yet"):
        c(torch.zeros(1, 2, D_V))
    with pytest.raises(ValueError, match="sharpness"):
        build_connector("word_mixture", D_V, 64, sharpness=1.0)


def test_output_is_a_softmax_mixture_of_the_lm_word_embeddings(lm):
    c = _bound(lm)
    assert c.words == caption_vocabulary(CAPTIONS) and c.config["vocabulary"] == c.words
    e = torch.as_tensor(llm_text_embeddings(*lm, c.words), dtype=torch.float32)
    assert torch.allclose(c.embeddings, e)
    x = torch.randn(3, 4, D_V)
    p = c.word_probabilities(x)
    assert torch.allclose(p.sum(-1), torch.ones(3, 4), atol=1e-6)
    assert torch.allclose(c(x), p @ e, atol=1e-6)
    assert c(x).shape == (3, 4, 64)


def test_seed_reads_the_map_as_words_at_the_target_sharpness(lm):
    c = _bound(lm)
    e = c.embeddings.double().numpy()
    rng = np.random.default_rng(0)
    m = AffineMap(rng.normal(size=(D_V, 64)), rng.normal(size=64) * 0.1)
    x = rng.normal(size=(64, 3, D_V)).astype(np.float32)
    info = c.seed(m, features=x)
    assert info["mean_top_word_probability"] == pytest.approx(0.8, abs=1e-3)
    # the most probable word of each token is the word embedding nearest (cosine) to the seed map's output
    y = m(x.reshape(-1, D_V))
    cos = (y / np.linalg.norm(y, axis=1, keepdims=True)) @ (e / np.linalg.norm(e, axis=1, keepdims=True)).T
    top = c.word_probabilities(torch.from_numpy(x)).reshape(-1, len(c.words)).argmax(1).numpy()
    assert (top == cos.argmax(1)).all()
    with pytest.raises(ValueError, match="sample of training features"):
        c.seed(m)


def test_round_trip_through_config_and_state_dict_without_the_lm(lm):
    c = _bound(lm)
    rebuilt = connector_from_config(c.config)
    rebuilt.load_state_dict(c.state_dict())
    x = torch.randn(2, 3, D_V)
    assert torch.equal(rebuilt(x), c(x))


def test_trains_inside_a_multimodal_lm(lm):
    c = _bound(lm)
    model = MultimodalLM(*lm, c, prompt="caption:", style_tokens=2)
    batch = {"image": torch.randn(4, 3, D_V), "text": CAPTIONS}
    model.loss(batch).backward()
    assert c.score.weight.grad is not None and c.score.weight.grad.abs().sum() > 0
    assert c.embeddings.grad is None and not c.embeddings.requires_grad  # the LM's words stay frozen


def test_style_tokens_before_or_after_the_image(lm):
    torch.manual_seed(0)
    conn = build_connector("linear", D_V, 64)
    after = MultimodalLM(*lm, conn, prompt="caption:", style_tokens=2)
    before = MultimodalLM(*lm, conn, prompt="caption:", style_tokens=2, style_position="before")
    before.style = after.style
    tokens = torch.randn(1, 3, 64)
    ids = torch.tensor([[3, 4]])
    a = after.build_inputs(tokens, ids, torch.ones_like(ids))["inputs_embeds"][0]
    b = before.build_inputs(tokens, ids, torch.ones_like(ids))["inputs_embeds"][0]
    p = len(after.prefix_ids)
    assert torch.equal(a[p:p + 3], tokens[0]) and torch.equal(a[p + 3:p + 5], after.style.detach())
    assert torch.equal(b[p:p + 2], after.style.detach()) and torch.equal(b[p + 2:p + 5], tokens[0])
    with pytest.raises(ValueError, match="style_position"):
        MultimodalLM(*lm, conn, style_position="middle")


def test_bag_of_words():
    vocab = ["blue", "circle", "red"]
    y = bag_of_words(["A red circle, red!", "nothing here", "Blue"], vocab)
    assert y.dtype == np.float32 and y.tolist() == [[0, 1, 1], [0, 0, 0], [1, 0, 0]]
