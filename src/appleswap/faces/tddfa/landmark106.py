"""The 106-point 2D landmark net of 3DDFA-V3's face box (``large_base_net.pth``) and its two-pass crop.

The reference crops a square 1.35x the RetinaFace box, predicts 106 points, re-crops around those points and
predicts again; the 5 alignment points are then taken from the second pass. The net is a MobileNet-v2-like stack
ending in a 106-channel 14x14 heatmap and a soft-argmax. Its soft-argmax weights the heatmap's *row* index for the
first output and the *column* index for the second (a quirk of ``torch.meshgrid`` order in the original); the
weights were trained that way, so it is reproduced as is.
"""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import torch
from torch import nn

from appleswap.faces.tddfa.checkpoints import load_checkpoint, load_strict, strip_prefix

INPUT_SIZE = 224
ENLARGE_RATIO = 1.35
PIXEL_MEAN = (103.94, 116.78, 123.68)  # subtracted from the RGB crop, as in the reference
NUM_POINTS = 106


def _conv_bn_prelu(inp: int, oup: int, kernel: int, stride: int, padding: int, groups: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(inp, oup, kernel, stride, padding, groups=groups, bias=False), nn.BatchNorm2d(oup),
            nn.PReLU(oup)]


class InvertedResidual(nn.Module):
    def __init__(self, inp: int, oup: int, stride: int, residual: bool, expand: int) -> None:
        super().__init__()
        hidden = inp * expand
        self.residual = residual
        self.conv = nn.Sequential(
            *_conv_bn_prelu(inp, hidden, 1, 1, 0),
            *_conv_bn_prelu(hidden, hidden, 3, stride, 1, groups=hidden),
            nn.Conv2d(hidden, oup, 1, 1, 0, bias=False),
            nn.BatchNorm2d(oup),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv(x) if self.residual else self.conv(x)


# (out width multiple of 64, stride, residual, expansion) for block2 .. block17
_BLOCKS = [(1, 1, False, 2), (1, 2, False, 2)] + [(1, 1, True, 2)] * 4 + [(2, 2, False, 2), (2, 1, False, 4)] \
    + [(2, 1, True, 4)] * 5 + [(2, 1, False, 2), (2, 2, False, 2), (2, 1, False, 2)]


class LargeBaseLmksNet(nn.Module):
    """block1 .. block19 with the original names; ``forward`` gives (B, 212) = (x0, y0, x1, ...) in [0, 1)."""

    def __init__(self, width: int = 64) -> None:
        super().__init__()
        self.block1 = nn.Sequential(*_conv_bn_prelu(3, width, 3, 2, 1))
        inp = width
        for index, (mult, stride, residual, expand) in enumerate(_BLOCKS, start=2):
            setattr(self, f"block{index}", InvertedResidual(inp, width * mult, stride, residual, expand))
            inp = width * mult
        self.block18 = nn.Sequential(*_conv_bn_prelu(inp, width * 4, 3, 1, 1))
        self.block19 = nn.Conv2d(width * 4, NUM_POINTS, 3, 1, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for index in range(1, 20):
            x = getattr(self, f"block{index}")(x)
        return soft_argmax(x)

    @classmethod
    def from_file(cls, path: str | Path) -> LargeBaseLmksNet:
        """Load ``large_base_net.pth`` (a dict whose ``state_dict`` has DataParallel ``module.`` keys)."""
        state = strip_prefix(load_checkpoint(path, key="state_dict"), "module.")
        if "block1.0.weight" not in state:
            raise ValueError(f"{path}: not the 3DDFA-V3 106-point landmark net (no block1.0.weight)")
        net = cls(int(state["block1.0.weight"].shape[0]))
        load_strict(net, state, path)
        return net.eval()


def soft_argmax(heatmap: torch.Tensor) -> torch.Tensor:
    """Expected (row, column) index over each channel's softmax, divided by (width, height); see module doc."""
    batch, channels, height, width = heatmap.shape
    prob = torch.softmax(heatmap.reshape(batch, channels, height * width).float(), dim=2)
    prob = prob.reshape(batch, channels, height, width)
    rows = torch.arange(height, dtype=prob.dtype, device=prob.device).view(1, 1, height, 1)
    cols = torch.arange(width, dtype=prob.dtype, device=prob.device).view(1, 1, 1, width)
    first = (prob * rows).sum(dim=(2, 3)) / width
    second = (prob * cols).sum(dim=(2, 3)) / height
    return torch.stack([first, second], dim=2).reshape(batch, channels * 2)


def square_crop(image: np.ndarray, x1: float, y1: float, x2: float, y2: float) -> tuple[np.ndarray, float, float, float]:
    """Square 224 crop around a box, 1.35x its longer side, padded with the pixel mean; returns (crop, x0, y0, side)."""
    width, height = x2 - x1 + 1, y2 - y1 + 1
    cx, cy = (x2 + x1) / 2, (y2 + y1) / 2
    side = max(height, width) * ENLARGE_RATIO
    left, top = cx - side / 2, cy - side / 2
    right, bottom = left + side, top + side
    img_h, img_w = image.shape[:2]
    dx, dy = max(0, -left), max(0, -top)
    edx, edy = max(0, right - img_w), max(0, bottom - img_h)
    crop = image[int(max(0, top)):int(min(img_h, bottom)), int(max(0, left)):int(min(img_w, right))]
    if dx > 0 or dy > 0 or edx > 0 or edy > 0:
        crop = cv2.copyMakeBorder(crop, int(dy), int(edy), int(dx), int(edx), cv2.BORDER_CONSTANT, value=PIXEL_MEAN)
    if crop.size == 0:
        raise ValueError(f"empty landmark crop for box {(x1, y1, x2, y2)} in a {img_w}x{img_h} image")
    return cv2.resize(crop, (INPUT_SIZE, INPUT_SIZE)), left, top, side


def _to_input(crop: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(((crop - np.array(PIXEL_MEAN)) / 255.0).transpose(2, 0, 1).astype(np.float32))


class Landmark106:
    """Two-pass 106-point landmarks for one face box per image, batched over images."""

    def __init__(self, net: LargeBaseLmksNet, device: str | torch.device = "cpu") -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()

    @torch.inference_mode()
    def _pass(self, images: list[np.ndarray], boxes: list[tuple[float, float, float, float]]) -> list[np.ndarray]:
        crops = [square_crop(image, *box) for image, box in zip(images, boxes)]
        batch = torch.stack([_to_input(c[0]) for c in crops]).to(self.device)
        out = (self.net(batch).float() * INPUT_SIZE).cpu().numpy().astype(np.float64).reshape(len(crops), -1, 2)
        return [pts * (side / INPUT_SIZE) + np.array([left, top]) for pts, (_, left, top, side) in zip(out, crops)]

    def __call__(self, images: list[np.ndarray], boxes: list[np.ndarray]) -> list[np.ndarray]:
        """(106, 2) float64 image-pixel landmarks per (RGB uint8 image, integer x1 y1 x2 y2 box)."""
        if not images:
            return []
        first = self._pass(images, [tuple(float(v) for v in box[:4]) for box in boxes])
        refined = [(p[:, 0].min(), p[:, 1].min(), p[:, 0].max(), p[:, 1].max()) for p in first]
        return self._pass(images, refined)
