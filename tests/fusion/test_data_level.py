"""Data-level fusion: RGB-D channel stacking (small CNN, MobileNetV2) and raw-vector concatenation."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from fusion import ChannelStackFusion, InputConcatFusion, build_fusion, fusion_module_params, model_params
from fusion.data_level import widen_first_conv

C = 3
B = 4
H = W = 32


pytestmark = pytest.mark.usefixtures("one_thread")


def rgbd(seed: int = 0, n: int = B) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "image": torch.randint(0, 256, (n, H, W, 3), generator=g, dtype=torch.uint8),
        "depth": torch.randint(0, 256, (n, H, W), generator=g, dtype=torch.uint8),
        "label": torch.randint(0, C, (n,), generator=g),
    }


def small(**kw) -> ChannelStackFusion:
    torch.manual_seed(0)
    return build_fusion("data/channel_stack", num_classes=C, width=8, **kw).eval()


def mobilenet_weights_path():
    from align.weights import MOBILENET_V2, package_file

    try:
        return package_file(*MOBILENET_V2, fetch=False)
    except FileNotFoundError:
        return None


def assert_every_param_gets_gradient(model: nn.Module, batch: dict) -> None:
    model.train()
    model.loss(batch).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"no gradient for {name}"
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, f"bad gradient for {name}"


def test_channel_stack_small_shapes_and_first_layer():
    model = small()
    assert (model.name, model.level, model.operator) == ("data/channel_stack", "data", "channel_stack")
    assert model.first_conv.in_channels == 4
    out = model(rgbd())
    assert out.shape == (B, C) and torch.isfinite(out).all()
    assert fusion_module_params(model) == model_params(model)  # no per-modality encoder at data level


def test_channel_stack_layouts_and_dtypes_agree():
    model = small()
    batch = rgbd()
    ref = model(batch)
    nchw_float = {"image": batch["image"].permute(0, 3, 1, 2).float() / 255, "depth": batch["depth"].float() / 255}
    torch.testing.assert_close(model(nchw_float), ref)
    torch.testing.assert_close(model(dict(batch, depth=batch["depth"].unsqueeze(1))), ref)
    assert model.stack(batch).shape == (B, 4, H, W)


def test_channel_stack_gradients_small():
    assert_every_param_gets_gradient(small(), rgbd())


def test_channel_stack_gradients_mobilenet():
    torch.manual_seed(0)
    model = ChannelStackFusion(C, backbone="mobilenet_v2", pretrained=False)
    assert model.first_conv.in_channels == 4
    assert_every_param_gets_gradient(model, rgbd())


def test_channel_stack_missing_modality():
    model = small()
    batch = rgbd()
    full = model(batch)
    for absent in ("image", "depth"):
        out = model({k: v for k, v in batch.items() if k != absent})
        assert out.shape == (B, C) and torch.isfinite(out).all()
        assert not torch.allclose(out, full)
    mask = torch.tensor([True, False, True, False])
    masked = dict(batch, depth=batch["depth"].float() / 255, depth_mask=mask)
    masked["depth"][~mask] = float("nan")
    out = model(masked)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[mask], full[mask])  # eval mode: samples don't interact
    assert not torch.allclose(out[~mask], full[~mask])
    with pytest.raises(ValueError, match="'image' or 'depth'"):
        model({"label": batch["label"]})
    with pytest.raises(ValueError, match="depth is"):
        model(dict(batch, depth=torch.zeros(B, H, W - 1)))
    with pytest.raises(ValueError, match="inputs\\['image'\\]"):
        model(dict(batch, image=torch.zeros(B, H, W, 2)))


def test_widen_first_conv_keeps_rgb_response_and_averages_filters():
    torch.manual_seed(0)
    conv = nn.Conv2d(3, 5, 3, stride=2, padding=1, bias=True)
    wide = widen_first_conv(conv)
    assert wide.in_channels == 4 and wide.stride == conv.stride and wide.padding == conv.padding
    torch.testing.assert_close(wide.weight[:, :3], conv.weight)
    torch.testing.assert_close(wide.weight[:, 3], conv.weight.mean(dim=1))
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(wide(torch.cat([x, torch.zeros(2, 1, 8, 8)], 1)), conv(x))  # zero depth: same output


@pytest.mark.skipif(mobilenet_weights_path() is None, reason="MobileNetV2 ImageNet weights not available offline")
def test_channel_stack_mobilenet_pretrained_keeps_imagenet_filters():
    path = mobilenet_weights_path()
    state = torch.load(path, map_location="cpu", weights_only=True)
    model = ChannelStackFusion(C, backbone="mobilenet_v2", pretrained=True).eval()
    w = model.first_conv.weight
    assert w.shape == (32, 4, 3, 3)
    torch.testing.assert_close(w[:, :3], state["features.0.0.weight"])
    torch.testing.assert_close(w[:, 3], state["features.0.0.weight"].mean(dim=1))
    # a deeper layer is ImageNet's too; the classifier is new, with C outputs
    torch.testing.assert_close(model.net.features[5].conv[0][0].weight, state["features.5.conv.0.0.weight"])
    assert model.net.classifier[-1].out_features == C
    out = model(rgbd())
    assert out.shape == (B, C) and torch.isfinite(out).all()


def test_channel_stack_bad_config():
    with pytest.raises(ValueError, match="backbone"):
        ChannelStackFusion(C, backbone="resnet")
    with pytest.raises(ValueError, match="pretrained"):
        ChannelStackFusion(C, backbone="small", pretrained=True)


DIMS = {"image": 6, "depth": 4, "text": 5}


def vectors(seed: int = 0, n: int = 8) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    batch = {m: torch.randn(n, d, generator=g) for m, d in DIMS.items()}
    batch["label"] = torch.randint(0, C, (n,), generator=g)
    return batch


def test_input_concat_shapes_params_and_gradients():
    torch.manual_seed(0)
    model = build_fusion("data/concat", in_dims=DIMS, num_classes=C, hidden=16)
    assert isinstance(model, InputConcatFusion) and model.name == "data/concat"
    assert model(vectors()).shape == (8, C)
    d_in = sum(DIMS.values()) + len(DIMS)  # + one presence flag per modality
    assert model_params(model) == fusion_module_params(model) == d_in * 16 + 16 + 16 * C + C
    batch = vectors()
    batch["text_mask"] = torch.tensor([True, False] * 4)
    assert_every_param_gets_gradient(model, batch)


def test_input_concat_missing_and_flattening():
    torch.manual_seed(0)
    model = InputConcatFusion(DIMS, C, hidden=16).eval()
    batch = vectors()
    full = model(batch)
    out = model({k: v for k, v in batch.items() if k != "depth"})
    assert out.shape == full.shape and torch.isfinite(out).all() and not torch.allclose(out, full)
    mask = torch.tensor([True, False] * 4)
    out = model(dict(batch, depth_mask=mask))
    torch.testing.assert_close(out[mask], full[mask])
    assert not torch.allclose(out[~mask], full[~mask])
    torch.testing.assert_close(model(dict(batch, image=batch["image"].view(8, 2, 3))), full)  # [N, ...] is flattened
    with pytest.raises(ValueError, match=r"inputs\['image'\] has 5 values"):
        model(dict(batch, image=torch.randn(8, 5)))
