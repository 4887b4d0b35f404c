"""A ResNet-50 trunk with torchvision's parameter names and an adjustable base width.

Both RetinaFace (``body.*``) and the 3DDFA-V3 coefficient regressor (``backbone.*``) store a torchvision-style
ResNet-50. Writing the trunk here (instead of calling ``torchvision.models.resnet50``) lets the width and block
counts be read back from a checkpoint, so the same code loads the real files and the reduced-width test files.
"""

from __future__ import annotations

import re

import torch
from torch import nn

EXPANSION = 4


class Bottleneck(nn.Module):
    """torchvision's Bottleneck (stride on the 3x3 conv, ResNet v1.5)."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample: nn.Module | None = None) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * EXPANSION, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes * EXPANSION)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return self.relu(out + identity)


def _make_layer(inplanes: int, planes: int, blocks: int, stride: int) -> nn.Sequential:
    downsample = None
    if stride != 1 or inplanes != planes * EXPANSION:
        downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes * EXPANSION, 1, stride, bias=False), nn.BatchNorm2d(planes * EXPANSION)
        )
    layers = [Bottleneck(inplanes, planes, stride, downsample)]
    layers += [Bottleneck(planes * EXPANSION, planes) for _ in range(1, blocks)]
    return nn.Sequential(*layers)


class ResNetTrunk(nn.Module):
    """conv1 .. layer4 of a bottleneck ResNet; ``forward`` returns the outputs of layer2, layer3 and layer4."""

    def __init__(self, width: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        if len(blocks) != 4 or min(blocks) < 1 or width < 1:
            raise ValueError(f"ResNetTrunk: need 4 positive block counts and width >= 1, got {blocks}, {width}")
        self.width = width
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _make_layer(width, width, blocks[0], 1)
        self.layer2 = _make_layer(width * EXPANSION, width * 2, blocks[1], 2)
        self.layer3 = _make_layer(width * 2 * EXPANSION, width * 4, blocks[2], 2)
        self.layer4 = _make_layer(width * 4 * EXPANSION, width * 8, blocks[3], 2)

    @property
    def out_channels(self) -> tuple[int, int, int]:
        return (self.width * 2 * EXPANSION, self.width * 4 * EXPANSION, self.width * 8 * EXPANSION)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        c2 = self.layer2(self.layer1(x))
        c3 = self.layer3(c2)
        c4 = self.layer4(c3)
        return c2, c3, c4


def trunk_shape(state: dict[str, torch.Tensor], prefix: str) -> tuple[int, tuple[int, ...]]:
    """(base width, blocks per layer) of the ResNet stored under ``prefix`` in a state dict."""
    key = f"{prefix}conv1.weight"
    if key not in state:
        raise ValueError(f"checkpoint has no {key!r}: not a ResNet stored under {prefix!r}")
    width = int(state[key].shape[0])
    blocks = []
    for layer in range(1, 5):
        pattern = re.compile(rf"^{re.escape(prefix)}layer{layer}\.(\d+)\.conv1\.weight$")
        indices = {int(m.group(1)) for k in state if (m := pattern.match(k))}
        if not indices:
            raise ValueError(f"checkpoint has no {prefix}layer{layer}.*: not a 4-stage ResNet")
        blocks.append(max(indices) + 1)
    return width, tuple(blocks)
