"""Contextual node features of caption graphs (align/graph_words.py) and the default TextGraphBuilder."""
from __future__ import annotations

import pytest
import torch

from align.graph_words import ContextualWordEmbedder, StaticWordEmbedder, caption_to_graph
from align.graphs import GraphTensors, TextGraphBuilder, parse_caption


@pytest.fixture(scope="module")
def ctx() -> ContextualWordEmbedder:
    torch.set_num_threads(1)
    return ContextualWordEmbedder.from_minilm(batch_size=2)


def test_word_features_are_means_of_the_last_hidden_states(ctx):
    words = ["a", "lilac", "dodecahedrons", "left", "of", "it", "."]
    enc = ctx.tokenizer([words], is_split_into_words=True, return_tensors="pt")
    with torch.no_grad():
        hidden = ctx.model(**enc).last_hidden_state[0]
    ids = enc.word_ids(0)
    assert ids.count(2) > 1  # "dodecahedrons" is really split into wordpieces
    got = ctx(words)
    assert got.shape == (len(words), 384)
    for w in range(len(words)):
        rows = [j for j, i in enumerate(ids) if i == w]
        torch.testing.assert_close(got[w], hidden[rows].mean(0))


def test_batched_equals_one_by_one_and_depends_on_context(ctx):
    caps = [["a", "red", "circle"], ["a", "river", "bank", "at", "dusk"], ["the", "bank", "gave", "a", "loan"], ["x"]]
    batched = ctx.embed_many(caps)  # batches of 2, padded
    for toks, b in zip(caps, batched):
        torch.testing.assert_close(b, ctx(toks), rtol=1e-4, atol=1e-5)
    bank_river, bank_money = batched[1][2], batched[2][1]
    assert torch.cosine_similarity(bank_river, bank_money, dim=0) < 0.99  # the same word, two contexts
    static = StaticWordEmbedder.from_minilm()
    torch.testing.assert_close(static(["bank"]), static(["bank"]))


def test_truncated_words_get_the_caption_mean():
    emb = ContextualWordEmbedder.from_minilm(max_length=4)  # [CLS] + 2 wordpieces + [SEP]
    out = emb(["red", "circle", "and", "square"])
    assert out.shape == (4, 384) and torch.isfinite(out).all()
    torch.testing.assert_close(out[2], out[:2].mean(0))
    torch.testing.assert_close(out[3], out[:2].mean(0))


def test_default_builder_is_contextual_and_batches(ctx, monkeypatch):
    b = TextGraphBuilder(ctx)
    calls = []
    real = ctx.embed_many
    monkeypatch.setattr(ctx, "embed_many", lambda caps: calls.append(len(caps)) or real(caps))
    texts = ["A chimpanzee.", "a red circle left of a blue square", "A chimpanzee.", "Tux—the Linux mascot!"]
    gt = b.build(texts, progress=False)
    assert isinstance(gt, GraphTensors) and len(gt) == 4 and calls == [2, 1]  # 3 distinct captions, batches of 2
    for i, t in enumerate(texts):  # the batched graphs equal one caption's graph
        x, ei, et = caption_to_graph(t, ctx)
        n, e = len(parse_caption(t).nodes), ei.shape[1]
        assert int(gt.num_nodes[i]) == n
        torch.testing.assert_close(gt.x[i, :n], x, rtol=1e-4, atol=1e-5)
        assert torch.equal(gt.edge_index[i, :, :e], ei) and torch.equal(gt.edge_type[i, :e], et)
    assert isinstance(TextGraphBuilder().embedder, ContextualWordEmbedder)  # the default
    with pytest.raises(ValueError, match="expected \\[tokens, dim\\]"):
        caption_to_graph("a red circle", ctx, token_features=torch.zeros(2, 384))


def test_graph_format_names_the_parser_and_the_word_embedder():
    from align.graph_caption import PARSER_VERSION
    from align.graph_store import graph_format
    from align.graph_words import ContextualWordEmbedder, StaticWordEmbedder

    assert graph_format() == graph_format(ContextualWordEmbedder)
    assert graph_format(StaticWordEmbedder) != graph_format()  # results from static word features are not reused
    assert f"parser={PARSER_VERSION}" in graph_format()
