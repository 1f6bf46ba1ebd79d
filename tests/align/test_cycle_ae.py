"""Tests of align.cycle_ae: shapes, gradients, partial pairing, training progress, save/load."""
from __future__ import annotations

import pytest
import torch

from align import CycleAE, build_aligner
from align.base import GradientAligner, encode_in_batches
from align.cycle_ae import make_pairing_mask, partially_paired

DX, DY, D = 12, 8, 6


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models: one intra-op thread avoids oversubscription stalls on a shared CPU."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def small_model(**kw) -> CycleAE:
    torch.manual_seed(0)
    return CycleAE({"image": DX, "text": DY}, latent_dim=D, hidden=(16,), **kw)


def toy_pairs(n: int = 64, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, 3, generator=g)
    x = torch.tanh(z @ torch.randn(3, DX, generator=g)) + 0.05 * torch.randn(n, DX, generator=g)
    y = z @ torch.randn(3, DY, generator=g) + 0.05 * torch.randn(n, DY, generator=g)
    return x, y


def test_shapes_and_interface():
    model = small_model()
    assert isinstance(model, GradientAligner) and model.modalities == ("image", "text")
    x, y = toy_pairs(10)
    zi, zt = model.encode("image", x), model.encode("text", y)
    assert zi.shape == (10, D) and zt.shape == (10, D)
    torch.testing.assert_close(zi.norm(dim=-1), torch.ones(10))
    assert model.latent("image", x).shape == (10, D)
    assert model.translate("image", x).shape == (10, DY) and model.translate("text", y).shape == (10, DX)
    assert encode_in_batches(model, "text", y, batch_size=3).shape == (10, D)
    out = model.loss({"image": x, "text": y})
    assert set(out) == {"recon", "cycle", "translation", "align", "loss"}
    assert all(v.ndim == 0 and torch.isfinite(v) for v in out.values())
    with pytest.raises(ValueError, match=r"'text' features must be \[N, 8\], got \(10, 12\)"):
        model.encode("text", x)
    with pytest.raises(ValueError, match="not 'depth'"):
        model.encode("depth", x)
    with pytest.raises(KeyError, match="batch\\['text'\\]"):
        model.loss({"image": x})
    with pytest.raises(ValueError, match=r"batch\['paired'\] must be a bool tensor of shape \[10\]"):
        model.loss({"image": x, "text": y, "paired": torch.ones(10)})


@pytest.mark.parametrize("alignment", ["infonce", "mse"])
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_gradients_reach_every_parameter(alignment, ratio):
    model = small_model(alignment=alignment)
    x, y = toy_pairs(16)
    paired = make_pairing_mask(16, ratio, seed=1)
    model.loss({"image": x, "text": y, "paired": paired})["loss"].backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert p.grad.abs().sum() > 0, f"{name} got a zero gradient"


def test_unpaired_rows_give_no_translation_or_alignment_gradient():
    model = small_model()
    x, y = toy_pairs(16)
    out = model.loss({"image": x, "text": y, "paired": torch.zeros(16, dtype=torch.bool)})
    assert out["translation"] == 0 and out["align"] == 0
    torch.testing.assert_close(out["loss"], out["recon"] + out["cycle"])
    out["loss"].backward()
    assert model.logit_scale.grad is None  # only the alignment term uses the temperature

    # With some rows paired, the pairing terms depend only on those rows: changing the text of an
    # unpaired row leaves them unchanged.
    paired = torch.tensor([True] * 8 + [False] * 8)
    y2 = y.clone()
    y2[12] += 5.0
    a = model.loss({"image": x, "text": y, "paired": paired})
    b = model.loss({"image": x, "text": y2, "paired": paired})
    torch.testing.assert_close(a["translation"], b["translation"])
    torch.testing.assert_close(a["align"], b["align"])
    assert not torch.allclose(a["recon"], b["recon"])


def test_loss_decreases_with_adam():
    model = small_model()
    x, y = toy_pairs(128)
    batch = partially_paired(x, y, ratio=0.5, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    first = {k: v.item() for k, v in model.loss(batch).items()}
    for _ in range(100):
        opt.zero_grad()
        model.loss(batch)["loss"].backward()
        opt.step()
    last = {k: v.item() for k, v in model.loss(batch).items()}
    assert last["loss"] < 0.5 * first["loss"]
    for term in ("recon", "cycle", "translation"):
        assert last[term] < first[term], term


def test_save_load_round_trip(tmp_path):
    model = small_model(alignment="infonce")
    with torch.no_grad():
        model.logit_scale.fill_(3.0)
    torch.save(model.state_dict(), tmp_path / "cycle_ae.pt")
    torch.manual_seed(123)  # a differently initialised copy
    clone = build_aligner("cycle_ae", input_dims={"image": DX, "text": DY}, latent_dim=D, hidden=(16,))
    x, y = toy_pairs(5)
    assert not torch.allclose(clone.encode("image", x), model.encode("image", x))
    clone.load_state_dict(torch.load(tmp_path / "cycle_ae.pt", weights_only=True))
    for m, v in (("image", x), ("text", y)):
        torch.testing.assert_close(clone.encode(m, v), model.encode(m, v))
    # the experiment runner's route: sizes from the data, the rest from the config
    built = CycleAE.from_inputs({"image": DX, "text": DY}, latent_dim=D, hidden=(16,))
    assert built.input_dims == {"image": DX, "text": DY} and built.state_dict().keys() == model.state_dict().keys()
    torch.testing.assert_close(clone.loss({"image": x, "text": y})["loss"], model.loss({"image": x, "text": y})["loss"])


def test_pairing_helpers():
    mask = make_pairing_mask(10, 0.3, seed=4)
    assert mask.dtype == torch.bool and mask.sum() == 3
    assert torch.equal(mask, make_pairing_mask(10, 0.3, seed=4))
    with pytest.raises(ValueError, match="ratio must be in"):
        make_pairing_mask(10, 1.5)
    x = torch.arange(20.0)[:, None].repeat(1, 2)
    y = -torch.arange(20.0)[:, None]
    data = partially_paired(x, y, ratio=0.25, seed=0, modalities=("image", "text"))
    paired = data["paired"]
    assert paired.sum() == 5 and set(data) == {"image", "text", "paired"}
    partner = -data["text"][:, 0].long()  # original index of each text row
    assert torch.equal(partner[paired], torch.arange(20)[paired])  # paired rows keep their partner
    assert (partner[~paired] != torch.arange(20)[~paired]).all()  # unpaired rows never do
    assert sorted(partner[~paired].tolist()) == torch.arange(20)[~paired].tolist()  # a permutation of them
    assert torch.equal(data["image"], x)
