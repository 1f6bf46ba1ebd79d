"""Tests of align.devise: the DeViSE map, its hinge rank loss and zero-shot flat hit@k."""
from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from align import build_aligner
from align.devise import DeViSE, HingeRankLoss, flat_hit_at_k, zero_shot_eval


pytestmark = pytest.mark.usefixtures("one_thread")


def _brute_force_hinge(scores: torch.Tensor, labels: torch.Tensor, margin: float, hardest: bool) -> torch.Tensor:
    """Frome et al.: mean over images of sum (or max) over wrong labels j of max(0, margin - s_y + s_j)."""
    per_image = []
    for i, y in enumerate(labels.tolist()):
        terms = [torch.clamp(margin - scores[i, y] + scores[i, j], min=0) for j in range(scores.shape[1]) if j != y]
        per_image.append(max(terms) if hardest else sum(terms))  # hinge is monotone: max of hinges = hinge of max
    return torch.stack(per_image).mean()


def _attribute_world(n_per_class: int = 12, seed: int = 0):
    """16 classes = 4 shapes x 4 colours. Class embedding and visual features are both (different, noisy)
    linear functions of the two attributes, so a map learned on 12 seen classes transfers to the 4 unseen
    combinations (each of whose shape and colour was seen in other classes)."""
    g = torch.Generator().manual_seed(seed)
    combos = list(itertools.product(range(4), range(4)))
    shape_txt, colour_txt = torch.randn(4, 32, generator=g), torch.randn(4, 32, generator=g)
    class_emb = torch.stack([shape_txt[s] + colour_txt[c] for s, c in combos])
    shape_img, colour_img = torch.randn(4, 24, generator=g), torch.randn(4, 24, generator=g)
    labels = torch.arange(16).repeat_interleave(n_per_class)
    x = torch.stack([shape_img[combos[y][0]] + colour_img[combos[y][1]] for y in labels.tolist()])
    x = x + 0.3 * torch.randn(x.shape, generator=g)
    unseen = torch.tensor([0, 5, 10, 15])  # the diagonal combos (shape i, colour i)
    seen_mask = torch.ones(16, dtype=torch.bool)
    seen_mask[unseen] = False
    return x, labels, class_emb, seen_mask


@pytest.mark.parametrize("negatives", ["all", "hardest"])
def test_hinge_rank_loss_equals_brute_force(negatives):
    torch.manual_seed(0)
    mapped, t = torch.randn(7, 8), F.normalize(torch.randn(5, 8), dim=-1)
    labels = torch.tensor([0, 1, 2, 3, 4, 0, 2])
    loss = HingeRankLoss(margin=0.3, negatives=negatives)(mapped, labels, t)
    torch.testing.assert_close(loss, _brute_force_hinge(mapped @ t.T, labels, 0.3, negatives == "hardest"))


@pytest.mark.parametrize("hidden", [None, 16])
def test_model_loss_is_hinge_of_its_scores(hidden):
    torch.manual_seed(0)
    model = DeViSE(10, torch.randn(6, 8), margin=0.1, hidden=hidden)
    x, y = torch.randn(9, 10), torch.randint(0, 6, (9,))
    torch.testing.assert_close(model.loss({"image": x, "label": y}),
                               _brute_force_hinge(model.scores(x), y, 0.1, hardest=False))


def test_class_embeddings_are_a_frozen_normalised_buffer():
    torch.manual_seed(0)
    raw = torch.randn(6, 8) * 3
    model = DeViSE(10, raw, hidden=16)
    assert "class_embeddings" in model.state_dict()
    assert all(p is not model.class_embeddings for p in model.parameters())
    assert not model.class_embeddings.requires_grad
    torch.testing.assert_close(model.class_embeddings, F.normalize(raw, dim=-1))
    before = model.class_embeddings.clone()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(12, 10), torch.randint(0, 6, (12,))
    for _ in range(5):
        loss = model.loss({"image": x, "label": y})
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert model.class_embeddings.grad is None
    assert torch.equal(model.class_embeddings, before)


@pytest.mark.parametrize("hidden,negatives", [(None, "all"), (16, "hardest")])
def test_gradients_reach_every_parameter(hidden, negatives):
    torch.manual_seed(0)
    model = DeViSE(10, torch.randn(6, 8), margin=1.0, hidden=hidden, negatives=negatives)
    model.loss({"image": torch.randn(12, 10), "label": torch.randint(0, 6, (12,))}).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


@pytest.fixture(scope="module")
def trained():
    """A linear DeViSE trained on the 12 seen classes of the attribute world (full batch, Adam)."""
    x, labels, class_emb, seen_mask = _attribute_world()
    train = seen_mask[labels]
    seen_ids = seen_mask.nonzero(as_tuple=True)[0]
    remap = torch.full((16,), -1, dtype=torch.long)
    remap[seen_ids] = torch.arange(len(seen_ids))
    torch.manual_seed(0)
    model = DeViSE(24, class_emb[seen_ids], margin=0.1)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = {"image": x[train], "label": remap[labels[train]]}
    losses = []
    for _ in range(150):
        loss = model.loss(batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return model, losses, (x, labels, class_emb, seen_mask)


def test_loss_decreases(trained):
    _, losses, _ = trained
    assert losses[-1] < 0.1 * losses[0], (losses[0], losses[-1])


def test_zero_shot_on_unseen_attribute_combinations(trained):
    model, _, (x, labels, class_emb, seen_mask) = trained
    res = zero_shot_eval(model, x, labels, class_emb, seen_mask, ks=(1, 2, 5))
    assert set(res) == {"seen", "unseen", "unseen_only", "harmonic"}
    # chance: hit@5 = 5/16 over all labels; hit@1 = 1/4 over the unseen labels alone
    assert res["unseen"]["hit@5"] > 0.8, res
    assert res["unseen_only"]["hit@1"] > 0.8, res
    assert res["seen"]["hit@1"] > 0.7, res  # (unseen labels compete in the generalised search)
    s, u = res["seen"]["hit@2"], res["unseen"]["hit@2"]
    assert res["harmonic"]["hit@2"] == pytest.approx(2 * s * u / (s + u))

    # the generalised and unseen-only protocols against a brute-force search
    scores = model.scores(x, class_emb).detach()
    unseen_rows = ~seen_mask[labels]
    brute_gen = [labels[i].item() in scores[i].argsort(descending=True)[:5].tolist()
                 for i in range(len(x)) if unseen_rows[i]]
    assert res["unseen"]["hit@5"] == pytest.approx(sum(brute_gen) / len(brute_gen))
    unseen_ids = (~seen_mask).nonzero(as_tuple=True)[0].tolist()
    brute_only = [max(unseen_ids, key=lambda j: scores[i, j].item()) == labels[i].item()
                  for i in range(len(x)) if unseen_rows[i]]
    assert res["unseen_only"]["hit@1"] == pytest.approx(sum(brute_only) / len(brute_only))


def test_flat_hit_at_k_equals_brute_force():
    torch.manual_seed(0)
    pred = torch.stack([torch.randperm(10)[:5] for _ in range(50)])
    labels = torch.randint(0, 10, (50,))
    res = flat_hit_at_k(pred, labels, ks=(1, 2, 5))
    for k in (1, 2, 5):
        brute = sum(labels[i].item() in pred[i, :k].tolist() for i in range(50)) / 50
        assert res[f"hit@{k}"] == pytest.approx(brute)
    with pytest.raises(ValueError, match="hit@5 needs at least 5"):
        flat_hit_at_k(pred[:, :3], labels, ks=(1, 5))
    with pytest.raises(ValueError, match="labels"):
        flat_hit_at_k(pred, labels[:-1])


def test_encode_predict_and_errors():
    torch.manual_seed(0)
    class_emb = torch.randn(6, 8)
    model = DeViSE(10, class_emb)
    x = torch.randn(4, 10)
    img = model.encode("image", x)
    assert img.shape == (4, 8)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(4))
    # text side is the frozen space itself: label embeddings encode to the stored class embeddings
    torch.testing.assert_close(model.encode("text", class_emb), model.class_embeddings)
    top = model.predict(x, k=3)
    assert top.shape == (4, 3)
    torch.testing.assert_close(top, (img @ model.class_embeddings.T).topk(3, dim=1).indices)
    other = torch.randn(9, 8)  # e.g. embeddings of unseen label names
    assert model.predict(x, class_embeddings=other, k=9).shape == (4, 9)
    with pytest.raises(ValueError, match="k=7"):
        model.predict(x, k=7)
    with pytest.raises(ValueError, match=r"\[C, 8\]"):
        model.predict(x, class_embeddings=torch.randn(3, 5))
    with pytest.raises(ValueError, match=r"\[B, 10\]"):
        model.encode("image", torch.randn(4, 11))
    with pytest.raises(ValueError, match=r"ints in \[0, 6\)"):
        model.loss({"image": x, "label": torch.tensor([0, 1, 2, 6])})
    with pytest.raises(ValueError, match="negatives"):
        DeViSE(10, class_emb, negatives="some")


def test_state_dict_round_trip(tmp_path):
    torch.manual_seed(0)
    class_emb = torch.randn(6, 8)
    model = build_aligner("devise", image_dim=10, class_embeddings=class_emb, hidden=12)
    torch.save(model.state_dict(), tmp_path / "devise.pt")
    torch.manual_seed(1)
    other = DeViSE(10, torch.zeros(6, 8) + 1, hidden=12)
    other.load_state_dict(torch.load(tmp_path / "devise.pt", weights_only=True))
    x = torch.randn(3, 10)
    torch.testing.assert_close(other.encode("image", x), model.encode("image", x))
    torch.testing.assert_close(other.class_embeddings, model.class_embeddings)
