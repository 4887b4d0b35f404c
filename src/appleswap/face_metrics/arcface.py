"""ArcFace IR-SE50 (the pSp / TreB1eN ``model_ir_se50.pth`` layout) for identity metrics and an ID loss.

Module names follow the checkpoint exactly (``input_layer``, ``body.<i>.res_layer`` / ``shortcut_layer``,
``output_layer``) so the released file loads with ``strict=True``. Embeddings are L2-normalised 512-d vectors.

Two ways in:
* :func:`identity_embedding` - differentiable, images in [0, 1], the pSp ID-loss preprocessing (pool to 256, crop
  [35:223, 32:220], pool to 112); for training losses and the pseudo-triplet scorer.
* :func:`reface_input` - the FFHQ-protocol preprocessing (resize to 112, normalise to [-1, 1], zero everything
  outside the parser face mask) that REFace's ID-retrieval script applies before the same pool/crop/pool.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from appleswap.files import read_tensor_file

log = logging.getLogger(__name__)

VERSION = "irse50-reface-1"
REAL_UNITS = (3, 4, 14, 3)
REAL_CHANNELS = (64, 128, 256, 512)


class SEModule(nn.Module):
    """Squeeze-and-excitation gate (``fc1``/``fc2`` are bias-free 1x1 convolutions, reduction 16)."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(channels, max(channels // reduction, 1), kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.fc2 = nn.Conv2d(max(channels // reduction, 1), channels, kernel_size=1, bias=False)
        self.sigmoid = nn.Sigmoid()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.sigmoid(self.fc2(self.relu(self.fc1(self.avg_pool(x)))))


class BottleneckIRSE(nn.Module):
    """Improved-residual unit with SE; the stride sits on the second 3x3 convolution."""

    def __init__(self, in_channels: int, depth: int, stride: int) -> None:
        super().__init__()
        if in_channels == depth:
            self.shortcut_layer: nn.Module = nn.MaxPool2d(1, stride)
        else:
            self.shortcut_layer = nn.Sequential(nn.Conv2d(in_channels, depth, 1, stride, bias=False),
                                                nn.BatchNorm2d(depth))
        self.res_layer = nn.Sequential(
            nn.BatchNorm2d(in_channels), nn.Conv2d(in_channels, depth, 3, 1, 1, bias=False), nn.PReLU(depth),
            nn.Conv2d(depth, depth, 3, stride, 1, bias=False), nn.BatchNorm2d(depth), SEModule(depth, 16),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_layer(x) + self.shortcut_layer(x)


class IRSE50(nn.Module):
    """IR-SE backbone at 112x112 input. ``units``/``channels`` default to the real IR-SE50; tests shrink them."""

    def __init__(self, units: tuple[int, ...] = REAL_UNITS, channels: tuple[int, ...] = REAL_CHANNELS,
                 drop_ratio: float = 0.6) -> None:
        super().__init__()
        if len(units) != len(channels) or not units:
            raise ValueError(f"IRSE50: units {units} and channels {channels} must have the same non-zero length")
        self.input_layer = nn.Sequential(nn.Conv2d(3, channels[0], 3, 1, 1, bias=False), nn.BatchNorm2d(channels[0]),
                                         nn.PReLU(channels[0]))
        modules, previous = [], channels[0]
        for count, depth in zip(units, channels):
            for index in range(count):
                modules.append(BottleneckIRSE(previous, depth, 2 if index == 0 else 1))
                previous = depth
        self.body = nn.Sequential(*modules)
        side = 112 // 2 ** len(units)
        self.output_layer = nn.Sequential(nn.BatchNorm2d(previous), nn.Dropout(drop_ratio), nn.Flatten(),
                                          nn.Linear(previous * side * side, 512), nn.BatchNorm1d(512, affine=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) in [-1, 1] -> (B, 512) unit vectors."""
        features = self.output_layer(self.body(self.input_layer(x)))
        return F.normalize(features, dim=1)


def _architecture_from_state(state: dict[str, torch.Tensor]) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Units per stage and stage widths read off the checkpoint (a new stage starts where the width changes)."""
    pattern = re.compile(r"^body\.(\d+)\.res_layer\.1\.weight$")
    depths = {int(m.group(1)): int(v.shape[0]) for k, v in state.items() if (m := pattern.match(k))}
    if not depths:
        raise ValueError("not an IR-SE checkpoint: no body.<i>.res_layer.1.weight keys")
    units: list[int] = []
    channels: list[int] = []
    for index in range(len(depths)):
        depth = depths[index]
        if not channels or depth != channels[-1]:
            channels.append(depth)
            units.append(0)
        units[-1] += 1
    return tuple(units), tuple(channels)


def load_irse50(path: str | Path, device: str | torch.device = "cpu") -> IRSE50:
    """Build IR-SE50 from ``model_ir_se50.pth`` (torch, weights only) or a safetensors copy; eval mode, frozen."""
    state = read_tensor_file(path, "IR-SE50 weights")
    state = {k.removeprefix("module.").removeprefix("facenet."): v for k, v in state.items()}
    units, channels = _architecture_from_state(state)
    if (units, channels) != (REAL_UNITS, REAL_CHANNELS):
        log.warning("%s: IR-SE with units %s and widths %s (not the released IR-SE50)", path, units, channels)
    model = IRSE50(units, channels)
    model.load_state_dict(state, strict=True)
    model.eval().requires_grad_(False)
    return model.to(device)


def _pool_crop_pool(x: torch.Tensor) -> torch.Tensor:
    """pSp's crop: pool to 256 (when not already), keep [35:223, 32:220], pool to 112."""
    if x.shape[-2:] != (256, 256):
        x = F.adaptive_avg_pool2d(x, (256, 256))
    return F.adaptive_avg_pool2d(x[:, :, 35:223, 32:220], (112, 112))


def identity_embedding(images: torch.Tensor, model: IRSE50) -> torch.Tensor:
    """Differentiable (B, 512) unit embeddings of FFHQ-aligned faces given in [0, 1]; usable as an ID loss."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"identity_embedding: images must be (B, 3, H, W), got {tuple(images.shape)}")
    return model(_pool_crop_pool(images * 2.0 - 1.0))


def reface_input(image: np.ndarray, mask: np.ndarray | None) -> torch.Tensor:
    """(3, 112, 112) in [-1, 1] as REFace prepares an FFHQ face: resize to 112, normalise, zero outside the mask."""
    small = cv2.resize(image, (112, 112), interpolation=cv2.INTER_LINEAR)
    tensor = torch.from_numpy(small).permute(2, 0, 1).float() / 127.5 - 1.0
    if mask is not None:
        weight = torch.from_numpy(mask.astype(np.float32))[None, None]
        weight = F.interpolate(weight, size=(112, 112), mode="bilinear", align_corners=False, antialias=True)
        tensor = tensor * weight[0]
    return tensor


@torch.no_grad()
def embed_prepared(model: IRSE50, batch: torch.Tensor) -> torch.Tensor:
    """Embeddings of a batch from :func:`reface_input` (the protocol's pool to 256 / crop / pool to 112)."""
    device = next(model.parameters()).device
    return model(_pool_crop_pool(batch.to(device))).float().cpu()
