"""The 3DDFA-V3 coefficient regressor (``net_recon.pth``): a ResNet-50 trunk, global average pooling and seven
1x1 convolutions (id 80, exp 64, albedo 80, angle 3, SH 27, tx-ty 2, tz 1) concatenated to 257 values.

Input: the aligned 224x224 RGB crop scaled to [0, 1], no mean/std normalisation (as in the reference).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from appleswap.faces.tddfa.checkpoints import load_checkpoint, load_strict, strip_prefix
from appleswap.faces.tddfa.resnet import ResNetTrunk, trunk_shape

HEAD_SIZES = (80, 64, 80, 3, 27, 2, 1)


class _Backbone(ResNetTrunk):
    """Trunk + global average pooling, giving (B, C, 1, 1) as the reference backbone with ``use_last_fc=False``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return torch.nn.functional.adaptive_avg_pool2d(super().forward(x)[-1], 1)


class ReconNet(nn.Module):
    """``backbone.*`` + ``final_layers.{0..6}``; ``forward`` returns (B, 257) coefficients."""

    def __init__(self, width: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.backbone = _Backbone(width, blocks)
        last = self.backbone.out_channels[-1]
        self.final_layers = nn.ModuleList([nn.Conv2d(last, size, 1, bias=True) for size in HEAD_SIZES])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.backbone(x)
        return torch.flatten(torch.cat([layer(feat) for layer in self.final_layers], dim=1), 1)

    @classmethod
    def from_file(cls, path: str | Path) -> ReconNet:
        """Load ``net_recon.pth`` (a dict with the state dict under ``net_recon``)."""
        state = strip_prefix(load_checkpoint(path, key="net_recon"), "module.")
        if "final_layers.0.weight" not in state:
            raise ValueError(f"{path}: not a 3DDFA-V3 ResNet regressor (no final_layers.0.weight; "
                             "the MobileNet-V3 net_recon_mbnet.pth is not supported)")
        width, blocks = trunk_shape(state, "backbone.")
        net = cls(width, blocks)
        load_strict(net, state, path)
        return net.eval()
