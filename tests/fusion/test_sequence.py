"""fusion.sequence: a 1-D conv encoder per sequence modality at data, feature and decision level."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import fusion
from fusion import FUSIONS
from fusion.sequence import Conv1dEncoder

pytestmark = pytest.mark.usefixtures("one_thread")

NAMES = ["data/conv1d", "feature/conv1d_concat", "feature/conv1d_sum", "feature/conv1d_gated", "feature/conv1d_tfn",
         "feature/conv1d_lmf", "decision/conv1d_mean", "decision/conv1d_vote"]


def _waves(n: int = 64, t: int = 40, seed: int = 0) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Class y = the frequency of both sensors' waves (random phases, sensor b noisier): the four classes have the
    same time average (about zero), so only an encoder that sees the time axis can tell them apart."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 4
    time = torch.arange(t).float()
    freq = torch.tensor([0.1, 0.25, 0.45, 0.7])[y]
    phase = 2 * np.pi * torch.rand(n, 2, generator=g)
    a = torch.sin(freq[:, None] * time + phase[:, :1]).unsqueeze(-1).repeat(1, 1, 3)
    b = torch.sin(freq[:, None] * time + phase[:, 1:]).unsqueeze(-1).repeat(1, 1, 2)
    return {"a": a + 0.3 * torch.randn(a.shape, generator=g), "b": b + 0.6 * torch.randn(b.shape, generator=g)}, y


def test_all_registered_with_grid_inputs_and_checked_options():
    assert set(NAMES) <= set(FUSIONS.names())
    for name in NAMES:
        cls = FUSIONS.get(name)
        assert cls.input_kind == "grid"
        m = fusion.build_strategy(cls, {"a": 3, "b": 2}, 4, seed=0)
        assert m.name == name
    with pytest.raises(TypeError):
        FUSIONS.get("feature/conv1d_lmf")({"a": 3, "b": 2}, 4, rnak=2)


def test_encoder_shapes_and_errors():
    enc = Conv1dEncoder(3, 7, width=8, kernel=3)
    assert enc(torch.randn(5, 20, 3)).shape == (5, 7)
    with pytest.raises(ValueError, match=r"tokens \[B, T, 3\], got \(5, 3, 20\)"):
        enc(torch.randn(5, 3, 20))


@pytest.mark.parametrize("name", NAMES)
def test_missing_rows_are_never_read(name):
    x, y = _waves(8)
    m = fusion.build_strategy(FUSIONS.get(name), {"a": 3, "b": 2}, 4, seed=0).eval()
    mask = torch.tensor([True, False] * 4)
    poisoned = {**x, "b": torch.where(mask[:, None, None], x["b"], torch.nan), "b_mask": mask}
    out = m(poisoned)
    assert out.shape == (8, 4) and torch.isfinite(out).all()
    torch.testing.assert_close(out[~mask], m({"a": x["a"][~mask]})[:, :] if name.startswith("data") else
                               m({"a": x["a"][~mask], "b_mask": torch.zeros(4, dtype=torch.bool),
                                  "b": x["b"][~mask]}))


@pytest.mark.parametrize("name", ["data/conv1d", "feature/conv1d_concat", "decision/conv1d_mean"])
def test_learns_what_the_time_average_cannot_show(name):
    x, y = _waves(64)
    torch.manual_seed(0)
    m = fusion.build_strategy(FUSIONS.get(name), {"a": 3, "b": 2}, 4, seed=0)
    opt = torch.optim.Adam(m.parameters(), 3e-3)
    for _ in range(150):
        loss = m.loss({**x, "label": y})
        opt.zero_grad()
        loss.backward()
        opt.step()
    xt, yt = _waves(64, seed=1)
    assert (m.predict_proba(xt).argmax(1) == yt).float().mean() > 0.9


def test_fusion_runner_on_tiny_basicmotions(tmp_path):
    from experiments.runners import fusion as runner
    from tests.experiments.test_fetch import ts_text

    (tmp_path / "BasicMotions_TRAIN.ts").write_text(ts_text(5, 0, length=12))
    (tmp_path / "BasicMotions_TEST.ts").write_text(ts_text(3, 1, length=12))
    raw = {"experiment": "fusion", "out_dir": str(tmp_path / "out"), "tasks": ["basicmotions"],
           "data": {"name": "basicmotions", "path": str(tmp_path), "representation": "sequence"},
           "strategies": {"feature/conv1d_sum": {"embed_dim": 8, "hidden": 8, "width": 4},
                          "decision/conv1d_mean": {"width": 4}},
           "seeds": [0], "train": {"max_steps": 3, "batch_size": 16}, "robustness": {"rates": [0.0, 1.0]},
           "latency_samples": 2}
    res = runner.run(runner.load(raw))
    text = runner.format_results(res)
    assert "feature/conv1d_sum" in text and "decision/conv1d_mean" in text
