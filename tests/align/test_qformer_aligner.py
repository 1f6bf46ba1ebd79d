"""The Q-Former aligner (BLIP-2 stage 1): masks, hard-negative mining, losses, gradients, save/load, MiniLM init,
re-ranking metrics and the stage-2 connector. Tiny random-init models except the one MiniLM test."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from open_clip.loss import ClipLoss

from align.base import ALIGNERS, build_aligner
from align.qformer_aligner import (QFormerAligner, QueryMaxClipLoss, max_query_similarity, mine_hard_negatives,
                                   qformer_connector)
from align.qformer_model import attention_mask

TINY = dict(image_dim=8, num_queries=4, num_layers=2, embed_dim=16, init="random", hidden=32, heads=4, ffn_dim=64,
            dropout=0.0, max_text_len=16)
CAPTIONS = ["a red circle", "a blue square left of a green star", "two small triangles", "a large purple cross",
            "the yellow diamond is above the red circle", "a green star", "an orange square", "a blue circle"]


def tiny(**kw) -> QFormerAligner:
    torch.manual_seed(0)
    return build_aligner("qformer", **{**TINY, **kw}).eval()


def grids(n: int = 8, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 6, 8, generator=torch.Generator().manual_seed(seed))


def test_registered_and_declares_inputs():
    cls = ALIGNERS.get("qformer")
    assert cls is QFormerAligner and cls.inputs == {"image": "grid", "text": "raw"}
    assert cls.optional_inputs == {"label": "class"}
    m = cls.from_inputs({"image": 8, "text": 0, "label": 0}, class_embeddings=torch.zeros(5, 3),
                        **{k: v for k, v in TINY.items() if k != "image_dim"}, cls_weight=1.0)
    assert m.cls_head.out_features == 5
    with pytest.raises(ValueError, match="num_classes"):
        build_aligner("qformer", **TINY, cls_weight=1.0)


def test_attention_masks():
    tm = torch.tensor([[1, 1, 1, 0]], dtype=torch.bool)
    uni, bi, causal = (attention_mask(2, tm, m, 1, torch.device("cpu"))[0, 0] for m in
                       ("unimodal", "bidirectional", "causal"))
    assert not uni[:2, 2:].any() and not uni[2:, :2].any() and uni[:2, :2].all()
    assert bi[:, :5].all() and not bi[:, 5].any()  # the padded token is never attended
    assert not causal[:2, 2:].any() and causal[2:, :2].all()
    assert causal[2, 3].item() is False and causal[3, 2].item() is True


def test_itc_mask_no_leak_from_text_into_queries():
    m = tiny()
    g = grids(2)
    ids_a, mask_a = m.tokenize(["a red circle", "a blue square"])
    ids_b, mask_b = m.tokenize(["two small triangles", "the green star"])
    with torch.no_grad():
        q_alone = m.query_outputs(g)
        q_a, t_a = m.qformer(g, ids_a, mask_a, mode="unimodal")
        q_b, _ = m.qformer(g, ids_b, mask_b, mode="unimodal")
        _, t_alone = m.qformer(ids=ids_a, text_mask=mask_a, with_queries=False)
        _, t_other_img = m.qformer(grids(2, seed=1), ids_a, mask_a, mode="unimodal")
        q_bi_a, _ = m.qformer(g, ids_a, mask_a, mode="bidirectional")
        q_bi_b, _ = m.qformer(g, ids_b, mask_b, mode="bidirectional")
    torch.testing.assert_close(q_a, q_b, rtol=0, atol=1e-6)
    torch.testing.assert_close(q_a, q_alone, rtol=0, atol=1e-5)
    valid = mask_a
    torch.testing.assert_close(t_a[valid], t_alone[valid], rtol=0, atol=1e-5)
    torch.testing.assert_close(t_a[valid], t_other_img[valid], rtol=0, atol=1e-5)  # nor image into text
    assert (q_bi_a - q_bi_b).abs().max() > 1e-3  # under ITM the queries do see the text


def test_itg_mask_is_causal_and_text_sees_queries():
    m = tiny()
    g = grids(1)
    ids, mask = m.tokenize(["a blue square left of a green star"])
    ids2 = ids.clone()
    ids2[0, -2] = m.tokenizer.convert_tokens_to_ids("red")  # change a later token
    with torch.no_grad():
        q1, t1 = m.qformer(g, ids, mask, mode="causal")
        q2, t2 = m.qformer(g, ids2, mask, mode="causal")
        _, t3 = m.qformer(grids(1, seed=3), ids, mask, mode="causal")
        _, tb1 = m.qformer(g, ids, mask, mode="bidirectional")
        _, tb2 = m.qformer(g, ids2, mask, mode="bidirectional")
    torch.testing.assert_close(t1[:, :-2], t2[:, :-2], rtol=0, atol=1e-6)
    torch.testing.assert_close(q1, q2, rtol=0, atol=1e-6)
    assert (t1[:, -2] - t2[:, -2]).abs().max() > 1e-3
    assert (t1[:, 0] - t3[:, 0]).abs().max() > 1e-6  # the first token already sees the image (via queries)
    assert (tb1[:, 0] - tb2[:, 0]).abs().max() > 1e-3  # bidirectional: earlier tokens see later ones


def test_hard_negative_mining_never_returns_a_positive():
    gen = torch.Generator().manual_seed(0)
    for trial in range(50):
        sim = torch.randn(12, 12, generator=gen) * 5
        pos = torch.rand(12, 12, generator=gen) < 0.3
        pos |= torch.eye(12, dtype=torch.bool)
        pos[trial % 12] = True  # a row with no candidate
        sim = sim + 100 * pos  # positives are the most similar: the tempting choice
        for sample in (True, False):
            neg = mine_hard_negatives(sim, pos, sample=sample, generator=gen)
            assert neg[trial % 12] == -1
            ok = neg >= 0
            assert not pos[torch.arange(12)[ok], neg[ok]].any()
            assert ok.sum() == (~pos).any(1).sum()


def test_positive_pairs_cover_repeated_images_and_identical_captions():
    m = tiny()
    g = grids(3)
    batch = {"image": g[[0, 0, 1, 2]], "text": ["a red circle", "a green star", "x y", "a red circle"]}
    ids, _ = m.tokenize(batch["text"])
    pos = m.positive_pairs(batch, ids)
    expected = torch.tensor([[1, 1, 0, 1], [1, 1, 0, 0], [0, 0, 1, 0], [1, 0, 0, 1]], dtype=torch.bool)
    assert torch.equal(pos, expected)


def test_itc_is_cliploss_with_one_query():
    img = torch.nn.functional.normalize(torch.randn(6, 1, 5), dim=-1)
    txt = torch.nn.functional.normalize(torch.randn(6, 5), dim=-1)
    ours = QueryMaxClipLoss()(img, txt, torch.tensor(10.0))
    ref = ClipLoss()(img[:, 0], txt, torch.tensor(10.0))
    torch.testing.assert_close(ours, ref)
    img4 = torch.nn.functional.normalize(torch.randn(3, 4, 5), dim=-1)
    assert torch.allclose(max_query_similarity(img4, txt), (img4 @ txt.T).amax(1))


def _batch(n_img: int = 4) -> dict:
    g = grids(n_img)
    caps = CAPTIONS[:n_img]
    idx = [i for i in range(n_img) for _ in range(2)]  # two rows per image, one caption each
    return {"image": g[idx], "text": [caps[i] for i in idx], "label": torch.tensor([i % 3 for i in idx]),
            "hard_negative": ["" if i % 2 else caps[(i + 1) % n_img] for i in idx]}


@pytest.mark.parametrize("objective", ["itc", "itm", "itg", "cls"])
def test_each_loss_decreases(objective, one_thread):
    weights = {f"{o}_weight": float(o == objective) for o in ("itc", "itm", "itg", "cls")}
    # ITM needs the text to see image-bearing queries twice (cross-attention in layers 0 and 2) and more steps
    m = tiny(num_classes=3, num_layers=3 if objective == "itm" else 2, **weights).train()
    batch = _batch()
    if objective == "itc":  # one row per image: ClipLoss counts the repeated row of an image as a negative
        batch = {k: v[::2] for k, v in batch.items()}
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range({"itm": 80, "itc": 60}.get(objective, 25)):
        out = m.loss(batch)
        assert set(out) == {objective}
        opt.zero_grad()
        out[objective].backward()
        opt.step()
        losses.append(out[objective].item())
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses


def test_gradients_reach_every_trainable_parameter():
    m = tiny(num_classes=3, cls_weight=1.0).train()
    sum(m.loss(_batch()).values()).backward()
    dead = [n for n, p in m.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.abs().sum() > 0)]
    assert not dead


def test_trainer_trains_it_from_paired_rows(one_thread):
    from experiments.pairs import PairedDataset
    from experiments.trainer import TrainConfig, Trainer

    m = tiny(itg_vocab="batch")
    g = grids(6).numpy()
    data = PairedDataset({"image": g}, {"text": CAPTIONS[:6] * 2}, np.tile(np.arange(6), 2))
    res = Trainer(TrainConfig(max_steps=3, batch_size=6, lr=1e-3, progress=False)).fit(m, data)
    assert res.steps == 3


def test_save_load_round_trip(tmp_path):
    m = tiny(num_classes=3, cls_weight=1.0)
    path = tmp_path / "qformer.pt"
    torch.save(m.state_dict(), path)
    torch.manual_seed(123)
    m2 = build_aligner("qformer", **TINY, num_classes=3, cls_weight=1.0).eval()
    m2.load_state_dict(torch.load(path, weights_only=True))
    g = grids(3)
    with torch.no_grad():
        for a, b in ((m.encode("image", g), m2.encode("image", g)),
                     (m.encode("text", CAPTIONS[:3]), m2.encode("text", CAPTIONS[:3])),
                     (m.itm_scores(g, CAPTIONS[:3]), m2.itm_scores(g, CAPTIONS[:3]))):
            torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_minilm_init_equals_minilm_text_outputs():
    """Text alone through the Q-Former = MiniLM's BertModel hidden states (all 6 layers, and the first 2)."""
    from transformers import AutoModel

    from align.qformer_model import minilm_dir
    from experiments.features import MiniLMEncoder

    bert = AutoModel.from_pretrained(minilm_dir(), local_files_only=True).float().eval()
    texts = ["a small red circle left of a blue square", "closest to the viewer is a big green disc", "hi"]
    outputs = {}
    for layers in (6, 2):
        m = build_aligner("qformer", image_dim=8, num_queries=2, num_layers=layers, max_text_len=256).eval()
        assert {n.split(".")[0] for n in m.new_parameters} == {"query_tokens", "vision_norm", "grid_positions", "layers"}
        assert all(".crossattention." in n for n in m.new_parameters if n.startswith("layers"))
        ids, mask = m.tokenize(texts)
        with torch.no_grad():
            ref = bert(input_ids=ids, attention_mask=mask.long(), output_hidden_states=True).hidden_states[layers]
            _, outputs[layers] = m.qformer(ids=ids, text_mask=mask, with_queries=False)
        torch.testing.assert_close(outputs[layers][mask], ref[mask], rtol=0, atol=1e-5)
    out6 = outputs[6]
    pooled = torch.nn.functional.normalize((out6 * mask[..., None]).sum(1) / mask.sum(1, keepdim=True), dim=-1)
    enc = MiniLMEncoder().encode(texts)["pooled"]
    np.testing.assert_allclose(pooled.numpy(), enc, atol=1e-5)


def test_ranks_from_scores_match_the_shared_evaluator():
    from experiments.qformer_eval import ranks_from_scores
    from experiments.retrieval import retrieval_ranks

    rng = np.random.default_rng(0)
    img, txt = rng.normal(size=(7, 5)), rng.normal(size=(20, 5))
    t2i = rng.integers(0, 7, 20)
    t2i[:7] = np.arange(7)
    norm = lambda x: x / np.linalg.norm(x, axis=1, keepdims=True)  # noqa: E731
    s = norm(img) @ norm(txt).T
    ours, ref = ranks_from_scores(s, s, t2i), retrieval_ranks(img, txt, t2i)
    np.testing.assert_array_equal(ours.image_to_text, ref.image_to_text)
    np.testing.assert_array_equal(ours.text_to_image, ref.text_to_image)


class _OracleITM:
    """ITM that knows the true pairs: log-odds 5 for a true pair, -5 otherwise."""

    def __init__(self, t2i):
        self.t2i = t2i

    def eval(self):
        return self

    def itm_scores(self, grid, texts):
        return torch.tensor([5.0 if self.t2i[int(t)] == int(g[0, 0]) else -5.0 for g, t in zip(grid, texts)])


def test_itm_rerank_fixes_the_top_k_only():
    from experiments.qformer_eval import ranks_from_scores, rerank_scores
    from experiments.retrieval import metrics_from_ranks

    rng = np.random.default_rng(1)
    n_img, t2i = 6, np.repeat(np.arange(6), 2)
    itc = rng.normal(size=(n_img, len(t2i))) * 0.1
    grid = np.arange(n_img, dtype=np.float32)[:, None, None] * np.ones((1, 1, 1), np.float32)
    texts = [str(j) for j in range(len(t2i))]
    before = metrics_from_ranks(ranks_from_scores(itc, itc, t2i))
    i2t, t2i_s = rerank_scores(_OracleITM(t2i), grid, texts, itc, k=len(t2i))
    after = metrics_from_ranks(ranks_from_scores(i2t, t2i_s, t2i))
    assert after["image_to_text"]["R@1"] == 100.0 and after["text_to_image"]["R@1"] == 100.0
    assert before["rsum"] < after["rsum"]
    i2t1, _ = rerank_scores(_OracleITM(t2i), grid, texts, itc, k=1)  # k=1: ranks of ITC are kept below the top-1
    order_rest = np.argsort(-itc[0])[1:]
    assert np.all(np.diff(i2t1[0, order_rest]) <= 0)


def test_stage2_connector_maps_grid_to_lm_tokens():
    m = tiny()
    conn = qformer_connector(m, lm_dim=12)
    out = conn(grids(3))
    assert out.shape == (3, conn.num_tokens(6), 12) and conn.num_tokens(6) == 4
    torch.testing.assert_close(conn.qformer.query_tokens, m.qformer.query_tokens)
    assert conn.qformer is not m.qformer  # a copy: training the bridge leaves the aligner as it was
    out.sum().backward()
    assert conn.qformer.layers[0].crossattention.key.weight.grad is not None


def test_given_pairs_add_the_negative_and_its_source():
    from align.qformer_aligner import given_pairs

    rows, texts, match = given_pairs({"hard_negative": ["a blue circle", "", ["x", "y"]],
                                      "hard_negative_source": ["a red circle", "", ["x0", "y0"]]})
    assert rows[:2] == [0, 0] and texts[:2] == ["a blue circle", "a red circle"] and match[:2] == [0, 1]
    assert rows[2:] == [2, 2] and (texts[2:], match[2:]) in ((["x", "x0"], [0, 1]), (["y", "y0"], [0, 1]))
    assert given_pairs({"hard_negative": ["a blue circle"]}) == ([0], ["a blue circle"], [0])  # no source: negative only
    assert given_pairs({"text": ["a"]}) == ([], [], [])


def test_itm_loss_uses_given_pairs(one_thread):
    m = tiny(itc_weight=0.0, itg_weight=0.0).train()
    b = _batch()
    base = {k: v for k, v in b.items() if k != "hard_negative"}
    torch.manual_seed(0)
    plain = m.loss(base)["itm"]
    torch.manual_seed(0)
    with_src = m.loss({**base, "hard_negative": ["a green star"] * len(base["text"]),
                       "hard_negative_source": base["text"]})["itm"]
    assert torch.isfinite(plain) and torch.isfinite(with_src) and not torch.isclose(plain, with_src)


def test_grid_positions_make_queries_see_where():
    g = grids(2)
    perm = g[:, torch.randperm(6, generator=torch.Generator().manual_seed(0))]
    for gp, differs in ((0, False), (16, True)):
        m = tiny(grid_positions=gp)
        with torch.no_grad():
            d = (m.query_outputs(g) - m.query_outputs(perm)).abs().max()
        assert (d > 1e-5) if differs else (d < 1e-6), (gp, d)  # without positions: a set of cells
    with pytest.raises(ValueError, match="grid_positions"):
        tiny(grid_positions=4).query_outputs(g)
