"""Head pose in degrees (yaw, pitch, roll): HopeNet (``hopenet_robust_alpha1``) or a MediaPipe + PnP fallback.

HopeNet is a torchvision-layout ResNet-50 with three 66-bin heads (``fc_yaw``, ``fc_pitch``, ``fc_roll``; the
vestigial ``fc_finetune`` is kept so the released state dict loads strictly). The angle is the expectation over
the bins: sum(softmax * index) * 3 - 99. Input follows the FFHQ protocol: the whole image resized to 224,
ImageNet normalisation. The fallback fits 11 BFM mean-face landmarks to mesh points with ``cv2.solvePnP``.
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
from torchvision.models.resnet import Bottleneck, ResNet

from appleswap.files import read_tensor_file

log = logging.getLogger(__name__)

HOPENET_VERSION = "hopenet-224-1"
PNP_VERSION = "mesh-pnp-1"
NUM_BINS = 66
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HopeNet(ResNet):
    """ResNet-50 trunk + yaw/pitch/roll bin classifiers; ``forward`` returns three (B, 66) logit tensors."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3), num_bins: int = NUM_BINS) -> None:
        super().__init__(Bottleneck, list(layers))
        del self.fc
        width = 512 * Bottleneck.expansion
        self.fc_yaw = nn.Linear(width, num_bins)
        self.fc_pitch = nn.Linear(width, num_bins)
        self.fc_roll = nn.Linear(width, num_bins)
        self.fc_finetune = nn.Linear(width + 3, 3)  # unused, present in the released checkpoint

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = torch.flatten(self.avgpool(x), 1)
        return self.fc_yaw(x), self.fc_pitch(x), self.fc_roll(x)


def _layers_from_state(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    counts = []
    for stage in range(1, 5):
        pattern = re.compile(rf"^layer{stage}\.(\d+)\.conv1\.weight$")
        counts.append(1 + max((int(m.group(1)) for k in state if (m := pattern.match(k))), default=-1))
    if min(counts) < 1:
        raise ValueError(f"not a HopeNet/ResNet checkpoint: blocks per stage {counts}")
    return tuple(counts)  # type: ignore[return-value]


def load_hopenet(path: str | Path, device: str | torch.device = "cpu") -> HopeNet:
    """HopeNet from ``hopenet_robust_alpha1.pkl`` (a torch state dict, loaded weights-only) or safetensors."""
    state = read_tensor_file(path, "HopeNet weights")
    state = {k.removeprefix("module."): v for k, v in state.items()}
    model = HopeNet(_layers_from_state(state))
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)


def bins_to_degrees(logits: torch.Tensor) -> torch.Tensor:
    """Expected angle over the 66 three-degree bins, in degrees."""
    index = torch.arange(logits.shape[-1], device=logits.device, dtype=torch.float32)
    return (F.softmax(logits.float(), dim=-1) * index).sum(dim=-1) * 3.0 - 99.0


def hopenet_input(images: list[np.ndarray]) -> torch.Tensor:
    """(B, 3, 224, 224): whole images resized to 224 (antialiased bilinear), ImageNet-normalised."""
    tensors = []
    for image in images:
        tensor = torch.from_numpy(image).permute(2, 0, 1).float()[None] / 255.0
        tensors.append(F.interpolate(tensor, size=(224, 224), mode="bilinear", align_corners=False, antialias=True))
    batch = torch.cat(tensors)
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (batch - mean) / std


@torch.no_grad()
def hopenet_angles(model: HopeNet, images: list[np.ndarray]) -> np.ndarray:
    """(B, 3) yaw, pitch, roll in degrees for uint8 RGB images (FFHQ-aligned faces)."""
    device = next(model.parameters()).device
    yaw, pitch, roll = model(hopenet_input(images).to(device))
    return torch.stack([bins_to_degrees(yaw), bins_to_degrees(pitch), bins_to_degrees(roll)], 1).cpu().numpy()


# 3D reference: the BFM mean-face landmarks used by Deep3DFaceRecon (x to the subject's left = image right, y up,
# z towards the viewer): eye corners (image left to right), nose tip, subnasale, mouth corners, lip centres, chin
_HEAD_BFM = np.array([[-0.431, 0.292, 0.104], [-0.192, 0.2888, 0.1635], [0.1879, 0.2887, 0.1602],
                      [0.4317, 0.2907, 0.1034], [0.0033, -0.0462, 0.5524], [0.0015, -0.1604, 0.3956],
                      [-0.2522, -0.3813, 0.2241], [0.2485, -0.3813, 0.2224], [0.0013, -0.2947, 0.4022],
                      [0.0017, -0.4507, 0.3696], [0.0027, -0.8249, 0.1967]], dtype=np.float64)
_HEAD_3D = _HEAD_BFM * np.array([1.0, -1.0, -1.0])  # to camera axes: x right, y down, z away from the camera
# the matching MediaPipe mesh vertices
_HEAD_MESH = (33, 133, 362, 263, 4, 2, 61, 291, 0, 17, 152)


def pnp_angles(mesh: np.ndarray, image_shape: tuple[int, int]) -> np.ndarray:
    """(3,) yaw, pitch, roll in degrees from a face mesh (fallback when HopeNet weights are absent).

    Yaw and roll change sign under a horizontal mirror; pitch does not (the 3D reference is symmetric).
    """
    height, width = image_shape[:2]
    points = mesh[list(_HEAD_MESH), :2].astype(np.float64)
    camera = np.array([[width, 0, width / 2.0], [0, width, height / 2.0], [0, 0, 1]], dtype=np.float64)
    ok, rvec, _ = cv2.solvePnP(_HEAD_3D, points, camera, np.zeros(4), flags=cv2.SOLVEPNP_SQPNP)
    if not ok:
        return np.full(3, np.nan, dtype=np.float32)
    rotation, _ = cv2.Rodrigues(rvec)
    yaw = np.degrees(np.arcsin(np.clip(-rotation[2, 0], -1.0, 1.0)))
    pitch = np.degrees(np.arctan2(rotation[2, 1], rotation[2, 2]))
    roll = np.degrees(np.arctan2(rotation[1, 0], rotation[0, 0]))
    return np.array([yaw, pitch, roll], dtype=np.float32)


def pose_error(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """L2 norm of the (yaw, pitch, roll) difference, in degrees, row-wise."""
    return np.linalg.norm(np.asarray(a, np.float64) - np.asarray(b, np.float64), axis=-1)
