"""RetinaFace (ResNet-50 + FPN + SSH) face boxes, as 3DDFA-V3's ``face_box`` runs it, batched.

Reproduces the reference numerics: longest side resized to 512 (bilinear), ImageNet normalisation, zero padding
to 512x512 centred, priors (16, 32) / (64, 128) / (256, 512) at strides 8 / 16 / 32, variances (0.1, 0.2), score
> 0.7, NMS 0.4, integer boxes mapped back to the original image. Parameter names follow
``retinaface_resnet50_2020-07-20_old_torch.pth`` (``body.*``, ``fpn.*``, ``ssh1.*``, ``ClassHead.0.conv1x1.*`` ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from appleswap.faces.tddfa.checkpoints import load_checkpoint, load_strict
from appleswap.faces.tddfa.resnet import ResNetTrunk, trunk_shape

MAX_SIZE = 512
MIN_SIZES = ((16, 32), (64, 128), (256, 512))
STEPS = (8, 16, 32)
VARIANCE = (0.1, 0.2)
MEAN = np.array([0.485, 0.456, 0.406], dtype=np.float32) * 255.0
STD = np.array([0.229, 0.224, 0.225], dtype=np.float32) * 255.0


def _conv_bn(inp: int, oup: int, kernel: int, leaky: float | None) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Conv2d(inp, oup, kernel, 1, kernel // 2, bias=False), nn.BatchNorm2d(oup)]
    if leaky is not None:
        layers.append(nn.LeakyReLU(negative_slope=leaky, inplace=True))
    return nn.Sequential(*layers)


class FPN(nn.Module):
    def __init__(self, in_channels: tuple[int, int, int], out: int) -> None:
        super().__init__()
        leaky = 0.1 if out <= 64 else 0.0
        self.output1 = _conv_bn(in_channels[0], out, 1, leaky)
        self.output2 = _conv_bn(in_channels[1], out, 1, leaky)
        self.output3 = _conv_bn(in_channels[2], out, 1, leaky)
        self.merge1 = _conv_bn(out, out, 3, leaky)
        self.merge2 = _conv_bn(out, out, 3, leaky)

    def forward(self, feats: tuple[torch.Tensor, ...]) -> list[torch.Tensor]:
        o1, o2, o3 = self.output1(feats[0]), self.output2(feats[1]), self.output3(feats[2])
        o2 = self.merge2(o2 + F.interpolate(o3, size=o2.shape[2:], mode="nearest"))
        o1 = self.merge1(o1 + F.interpolate(o2, size=o1.shape[2:], mode="nearest"))
        return [o1, o2, o3]


class SSH(nn.Module):
    def __init__(self, inp: int, out: int) -> None:
        super().__init__()
        if out % 4:
            raise ValueError(f"SSH: out channels must be a multiple of 4, got {out}")
        leaky = 0.1 if out <= 64 else 0.0
        self.conv3X3 = _conv_bn(inp, out // 2, 3, None)
        self.conv5X5_1 = _conv_bn(inp, out // 4, 3, leaky)
        self.conv5X5_2 = _conv_bn(out // 4, out // 4, 3, None)
        self.conv7X7_2 = _conv_bn(out // 4, out // 4, 3, leaky)
        self.conv7x7_3 = _conv_bn(out // 4, out // 4, 3, None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mid = self.conv5X5_1(x)
        out = torch.cat([self.conv3X3(x), self.conv5X5_2(mid), self.conv7x7_3(self.conv7X7_2(mid))], dim=1)
        return F.relu(out)


class _Head(nn.Module):
    def __init__(self, inp: int, anchors: int, size: int) -> None:
        super().__init__()
        self.size = size
        self.conv1x1 = nn.Conv2d(inp, anchors * size, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.conv1x1(x).permute(0, 2, 3, 1).contiguous()
        return out.view(out.shape[0], -1, self.size)


class RetinaFaceNet(nn.Module):
    """The network; ``forward`` returns (box deltas, class logits, 5-point deltas) for every prior."""

    def __init__(self, width: int = 64, blocks: tuple[int, ...] = (3, 4, 6, 3), out: int = 256, anchors: int = 2):
        super().__init__()
        self.body = ResNetTrunk(width, blocks)
        self.fpn = FPN(self.body.out_channels, out)
        self.ssh1, self.ssh2, self.ssh3 = SSH(out, out), SSH(out, out), SSH(out, out)
        self.ClassHead = nn.ModuleList([_Head(out, anchors, 2) for _ in range(3)])
        self.BboxHead = nn.ModuleList([_Head(out, anchors, 4) for _ in range(3)])
        self.LandmarkHead = nn.ModuleList([_Head(out, anchors, 10) for _ in range(3)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        fpn = self.fpn(self.body(x))
        feats = [self.ssh1(fpn[0]), self.ssh2(fpn[1]), self.ssh3(fpn[2])]
        boxes = torch.cat([head(f) for head, f in zip(self.BboxHead, feats)], dim=1)
        logits = torch.cat([head(f) for head, f in zip(self.ClassHead, feats)], dim=1)
        points = torch.cat([head(f) for head, f in zip(self.LandmarkHead, feats)], dim=1)
        return boxes, logits, points

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor], source: str | Path = "state dict") -> RetinaFaceNet:
        """Build with the widths stored in ``state`` (the real file: width 64, 256 FPN channels) and load it."""
        width, blocks = trunk_shape(state, "body.")
        if "fpn.output1.0.weight" not in state or "ClassHead.0.conv1x1.weight" not in state:
            raise ValueError(f"{source}: not a RetinaFace ResNet-50 checkpoint (no fpn.output1 / ClassHead keys)")
        out = int(state["fpn.output1.0.weight"].shape[0])
        anchors = int(state["ClassHead.0.conv1x1.weight"].shape[0]) // 2
        net = cls(width, blocks, out, anchors)
        load_strict(net, state, source)
        return net.eval()


def prior_boxes(size: int = MAX_SIZE) -> torch.Tensor:
    """(P, 4) priors (cx, cy, w, h), relative to ``size``, in the reference order (level, row, column, anchor)."""
    rows = []
    for sizes, step in zip(MIN_SIZES, STEPS):
        fh, fw = -(-size // step), -(-size // step)
        i, j = np.meshgrid(np.arange(fh), np.arange(fw), indexing="ij")
        cx, cy = (j + 0.5) * step / size, (i + 0.5) * step / size
        per = [np.stack([cx, cy, np.full_like(cx, s / size), np.full_like(cy, s / size)], -1) for s in sizes]
        rows.append(np.stack(per, axis=2).reshape(-1, 4))
    return torch.from_numpy(np.concatenate(rows).astype(np.float32))


def decode_boxes(loc: torch.Tensor, priors: torch.Tensor) -> torch.Tensor:
    """SSD box decoding to (x1, y1, x2, y2) relative coordinates."""
    centre = priors[:, :2] + loc[:, :2] * VARIANCE[0] * priors[:, 2:]
    size = priors[:, 2:] * torch.exp(loc[:, 2:] * VARIANCE[1])
    return torch.cat([centre - size / 2, centre + size / 2], dim=1)


@dataclass
class _Prepared:
    tensor: torch.Tensor
    pads: tuple[int, int]  # (x, y) padding before the image
    coeff: float  # original pixels per network pixel
    shape: tuple[int, int]  # original (H, W)


def prepare(image: np.ndarray) -> _Prepared:
    """Resize the longest side to 512, normalise, pad to 512x512 (the albumentations path of the reference)."""
    height, width = image.shape[:2]
    scale = MAX_SIZE / float(max(height, width))
    if scale != 1.0:
        size = (round(width * scale), round(height * scale))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
    normed = (image.astype(np.float32) - MEAN) * (1.0 / STD)
    pad_y, pad_x = MAX_SIZE - normed.shape[0], MAX_SIZE - normed.shape[1]
    top, left = pad_y // 2, pad_x // 2
    padded = cv2.copyMakeBorder(normed, top, pad_y - top, left, pad_x - left, cv2.BORDER_CONSTANT, value=0)
    tensor = torch.from_numpy(np.ascontiguousarray(padded.transpose(2, 0, 1)))
    return _Prepared(tensor, (left, top), max(height, width) / MAX_SIZE, (height, width))


class RetinaFaceDetector:
    """Face boxes (x1, y1, x2, y2) in image pixels, best first, with the reference's thresholds and rounding."""

    def __init__(self, net: RetinaFaceNet, device: str | torch.device = "cpu", confidence: float = 0.7,
                 nms_threshold: float = 0.4) -> None:
        self.device = torch.device(device)
        self.net = net.to(self.device).eval()
        self.priors = prior_boxes().to(self.device)
        self.confidence, self.nms_threshold = confidence, nms_threshold

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device = "cpu") -> RetinaFaceDetector:
        return cls(RetinaFaceNet.from_state_dict(load_checkpoint(path), path), device)

    @torch.inference_mode()
    def detect_batch(self, images: list[np.ndarray]) -> list[np.ndarray]:
        """One (N, 4) int64 array of boxes per RGB uint8 image, highest score first (N may be 0)."""
        if not images:
            return []
        prepared = [prepare(image) for image in images]
        batch = torch.stack([p.tensor for p in prepared]).to(self.device)
        loc, logits, _ = self.net(batch)
        scores = F.softmax(logits.float(), dim=-1)[..., 1]
        return [self._postprocess(loc[i].float(), scores[i], prepared[i]) for i in range(len(images))]

    def _postprocess(self, loc: torch.Tensor, scores: torch.Tensor, prep: _Prepared) -> np.ndarray:
        from torchvision.ops import nms

        boxes = decode_boxes(loc, self.priors) * MAX_SIZE
        valid = scores > self.confidence
        boxes, scores = boxes[valid], scores[valid]
        order = torch.sort(scores, descending=True, stable=True).indices
        boxes, scores = boxes[order], scores[order]
        keep = nms(boxes, scores, self.nms_threshold)
        boxes = boxes[keep].int().cpu().numpy()
        if boxes.shape[0] == 0:
            return np.zeros((0, 4), dtype=np.int64)
        boxes = boxes - np.array([prep.pads[0], prep.pads[1], prep.pads[0], prep.pads[1]], dtype=boxes.dtype)
        boxes = (boxes * prep.coeff).astype(np.int64)
        return np.array([b for b in boxes if _usable(b, prep.shape)], dtype=np.int64).reshape(-1, 4)


def _usable(box: np.ndarray, shape: tuple[int, int]) -> bool:
    """The reference drops boxes that collapse once clipped to the image."""
    height, width = shape
    x_min = np.clip(box[0], 0, width - 1)
    x_max = np.clip(box[2], x_min + 1, width - 1)
    y_min = np.clip(box[1], 0, height - 1)
    y_max = np.clip(box[3], y_min + 1, height - 1)
    return bool(x_min < x_max and y_min < y_max)
