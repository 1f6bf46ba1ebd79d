"""DeViSE with caption targets (``targets="captions"``): the hinge rank loss over a batch's distinct captions."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from align.devise import DeViSE

pytestmark = pytest.mark.usefixtures("one_thread")


def _hinge_sum(scores: torch.Tensor, labels: list[int], margin: float) -> torch.Tensor:
    return torch.stack([sum(torch.clamp(margin - scores[i, y] + scores[i, j], min=0)
                            for j in range(scores.shape[1]) if j != y) for i, y in enumerate(labels)]).mean()


def test_caption_loss_is_the_hinge_over_distinct_captions():
    torch.manual_seed(0)
    model = DeViSE(10, torch.randn(3, 8), margin=0.2, targets="captions")
    caps = torch.randn(3, 8)
    text = caps[[0, 1, 0, 2, 1]]  # a caption repeated in the batch is one label, never its own negative
    x = torch.randn(5, 10)
    uniq = F.normalize(caps, dim=-1)
    order = torch.unique(uniq, dim=0)  # the label order torch.unique gives
    labels = [int(torch.nonzero((order == F.normalize(t, dim=-1)).all(1))[0]) for t in text]
    expected = _hinge_sum(model.map(x) @ order.T, labels, 0.2)
    torch.testing.assert_close(model.loss({"image": x, "text": text}), expected)


def test_caption_targets_learn_retrieval_that_label_targets_cannot():
    """Two captions per class: class-name targets cannot tell them apart, caption targets can."""
    g = torch.Generator().manual_seed(0)
    n_cap, d_img, d_txt = 16, 12, 8
    caps = torch.randn(n_cap, d_txt, generator=g)
    proj = torch.randn(d_txt, d_img, generator=g)
    idx = torch.arange(n_cap).repeat(8)
    x = caps[idx] @ proj + 0.1 * torch.randn(len(idx), d_img, generator=g)
    labels = idx // 2  # 8 classes of two captions each
    class_emb = torch.stack([caps[2 * c] + caps[2 * c + 1] for c in range(8)])

    def top1(targets: str) -> float:
        torch.manual_seed(0)
        model = DeViSE(d_img, class_emb, margin=0.1, targets=targets)
        opt = torch.optim.Adam(model.parameters(), 1e-2)
        for _ in range(200):
            loss = model.loss({"image": x, "text": caps[idx], "label": labels})
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            sims = model.encode("image", x) @ model.encode("text", caps).T
        return float((sims.argmax(1) == idx).float().mean())

    assert top1("captions") > 0.9
    assert top1("labels") < 0.7


def test_caption_target_errors():
    model = DeViSE(4, torch.randn(3, 6), targets="captions")
    with pytest.raises(ValueError, match=r"text must be caption embeddings \[B=2, 6\]"):
        model.loss({"image": torch.randn(2, 4), "text": torch.randn(2, 5)})
    with pytest.raises(ValueError, match="at least two distinct captions"):
        model.loss({"image": torch.randn(2, 4), "text": torch.ones(2, 6)})
    with pytest.raises(ValueError, match="targets must be 'labels' or 'captions'"):
        DeViSE(4, torch.randn(3, 6), targets="words")
