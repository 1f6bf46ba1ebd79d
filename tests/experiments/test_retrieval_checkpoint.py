"""A model that collapses during training is not kept as best.pt by Trainer + RetrievalEvaluator."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from experiments.checkpoint import load_checkpoint
from experiments.retrieval import RetrievalEvaluator
from experiments.trainer import Trainer, TrainConfig

COLLAPSE_AFTER = 40


class CollapsingAligner(nn.Module):
    """Two linear heads trained with InfoNCE for ``COLLAPSE_AFTER`` steps; then its loss drives a
    ReLU gate to exactly 0, so every embedding becomes the same constant vector (not zero: the
    collapse is scored, not rejected)."""

    modalities = ("image", "text")

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.image = nn.Linear(12, 8)
        self.text = nn.Linear(10, 8)
        self.gate = nn.Parameter(torch.tensor(0.3))
        self.register_buffer("center", torch.full((8,), 0.5))
        self.register_buffer("steps", torch.zeros((), dtype=torch.long))

    def encode(self, modality: str, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.gate) * getattr(self, modality)(x) + self.center

    def loss(self, batch: dict) -> torch.Tensor:
        self.steps += 1
        if self.steps > COLLAPSE_AFTER:
            return (self.gate + 1.0) ** 2  # the collapse
        img = F.normalize(self.encode("image", batch["image"]), dim=1)
        txt = F.normalize(self.encode("text", batch["text"]), dim=1)
        logits = 10.0 * img @ txt.T
        target = torch.arange(len(img))
        return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2


@pytest.fixture(scope="module")
def data():
    rng = np.random.default_rng(0)
    A = rng.standard_normal((12, 10)).astype(np.float32)
    x = rng.standard_normal((260, 12)).astype(np.float32)
    y = (x @ A + 0.5 * rng.standard_normal((260, 10))).astype(np.float32)
    train = {"image": torch.from_numpy(x[:200]), "text": torch.from_numpy(y[:200])}
    # validation: 20 images, 3 noisy captions each
    vi = torch.from_numpy(x[200:220])
    g = np.repeat(np.arange(20), 3)
    vt = torch.from_numpy((x[200:220][g] @ A + 0.5 * rng.standard_normal((60, 10))).astype(np.float32))
    return train, vi, vt, g


def _fit(data, tmp_path, ties):
    train, vi, vt, g = data
    cfg = TrainConfig(max_steps=COLLAPSE_AFTER + 60, batch_size=50, lr=0.05, min_lr_ratio=1.0, eval_every=10,
                      out_dir=tmp_path, save_every=None, progress=False, device="cpu", precision="fp32",
                      log_every=1000)
    model = CollapsingAligner()
    result = Trainer(cfg, RetrievalEvaluator(vi, vt, g, ks=(1, 5), ties=ties)).fit(model, train)
    return model, result


def test_collapsed_model_is_not_kept_as_best(data, tmp_path):
    model, result = _fit(data, tmp_path / "expected", "expected")
    assert torch.relu(model.gate).item() == 0.0  # the final model did collapse ...
    final = result.final_metrics
    assert final["t2i/R@1"] == pytest.approx(100 / 20) and final["i2t/R@1"] == pytest.approx(100 * 3 / 60)
    assert final["t2i/tied_fraction"] == 1.0
    # ... and best.pt is a model from before the collapse, much better than chance
    assert result.best_step <= COLLAPSE_AFTER + 10
    best = load_checkpoint(tmp_path / "expected" / "best.pt")
    assert best["step"] == result.best_step and best["model"]["gate"].item() > 0
    assert best["metrics"]["rsum"] > 2 * final["rsum"]


def test_the_old_convention_would_keep_the_collapsed_model(data, tmp_path):
    """The same run scored with ties in the query's favour picks the collapsed weights (rsum 400 of 400)."""
    _, result = _fit(data, tmp_path / "optimistic", "optimistic")
    assert result.best_metrics["rsum"] == 400.0
    assert result.best_step > COLLAPSE_AFTER
    assert load_checkpoint(tmp_path / "optimistic" / "best.pt")["model"]["gate"].item() <= 0
