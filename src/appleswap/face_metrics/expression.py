"""Expression: Deep3DFaceRecon 64-d BFM expression coefficients, or a mesh-ratio fallback.

Deep3DFaceRecon's ``ReconNetWrapper`` is a torchvision ResNet-50 trunk (no ``fc``) plus seven 1x1 convolutions
(``final_layers.0-6``: id 80, exp 64, tex 80, angle 3, gamma 27, trans 2 + 1 = 257 coefficients); the released
``epoch_20.pth`` stores it under ``net_recon``. Two input modes:

* ``reface`` (the FFHQ protocol as REFace scores it): the whole image bicubic-resized to 512, RGB in [0, 1];
* ``aligned`` (Deep3DFaceRecon's own test path): 5 points fitted to the BFM 3D landmarks (scale + translation),
  rescale factor 102, 224 crop.

Without weights, :func:`mesh_expression` gives 7 pose- and scale-normalised mesh ratios (mouth opening and width,
eye openings, brow heights, smile); its L2 is labelled "mesh expression (fallback)", a different unit.
"""

from __future__ import annotations

import logging
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image
from torch import nn
from torchvision.models.resnet import Bottleneck, ResNet

from appleswap.files import read_tensor_file

log = logging.getLogger(__name__)

D3D_VERSION = "deep3d-exp-1"
MESH_VERSION = "mesh-expr-1"
COEFF_SPLIT = (("id", 80), ("exp", 64), ("tex", 80), ("angle", 3), ("gamma", 27), ("trans_xy", 2), ("trans_z", 1))
# the BFM's 5 standard 3D landmarks (eye centres, nose tip, mouth corners; similarity_Lm3D_all.mat reduced to 5)
BFM_LM5 = np.array([[-0.311487, 0.290361, 0.13378], [0.309799, 0.28972, 0.131795], [0.003253, -0.046179, 0.552442],
                    [-0.252169, -0.381339, 0.224057], [0.248466, -0.381282, 0.222358]], dtype=np.float64)


class ReconNet(nn.Module):
    """Deep3DFaceRecon coefficient regressor: (B, 3, H, W) RGB in [0, 1] -> (B, 257)."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 6, 3)) -> None:
        super().__init__()
        self.backbone = ResNet(Bottleneck, list(layers))
        del self.backbone.fc
        width = 512 * Bottleneck.expansion
        self.final_layers = nn.ModuleList([nn.Conv2d(width, size, 1, bias=True) for _, size in COEFF_SPLIT])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = self.backbone
        x = b.maxpool(b.relu(b.bn1(b.conv1(x))))
        x = b.avgpool(b.layer4(b.layer3(b.layer2(b.layer1(x)))))
        return torch.flatten(torch.cat([layer(x) for layer in self.final_layers], dim=1), 1)


def load_reconnet(path: str | Path, device: str | torch.device = "cpu") -> ReconNet:
    """ReconNet from Deep3DFaceRecon's ``epoch_20.pth`` (key ``net_recon``, weights only) or a bare state dict."""
    from appleswap.face_metrics.pose import _layers_from_state

    state = read_tensor_file(path, "Deep3DFaceRecon weights")
    state = state.get("net_recon", state)
    state = {k.removeprefix("module."): v for k, v in state.items()}
    trunk = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    model = ReconNet(_layers_from_state(trunk))
    model.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)


def _pos_fit(points: np.ndarray, height: int) -> tuple[np.ndarray, float]:
    """Translation and scale of an affine camera mapping BFM_LM5 onto the 5 points (y measured upwards)."""
    image = np.stack([points[:, 0], height - 1 - points[:, 1]], axis=1).astype(np.float64)
    design = np.zeros((10, 8))
    design[0::2, 0:3], design[0::2, 3] = BFM_LM5, 1.0
    design[1::2, 4:7], design[1::2, 7] = BFM_LM5, 1.0
    solution = np.linalg.lstsq(design, image.reshape(-1), rcond=None)[0]
    scale = (np.linalg.norm(solution[0:3]) + np.linalg.norm(solution[4:7])) / 2.0
    return np.array([solution[3], solution[7]]), float(scale)


def aligned_crop(image: np.ndarray, points: np.ndarray, size: int = 224, rescale: float = 102.0) -> np.ndarray:
    """Deep3DFaceRecon's test-time crop: 224x224 with the face scaled so the BFM landmarks span ``rescale``."""
    translation, scale = _pos_fit(points, image.shape[0])
    s = rescale / scale
    matrix = np.array([[s, 0.0, size / 2.0 - s * translation[0]],
                       [0.0, s, size / 2.0 + s * (translation[1] - image.shape[0])]], dtype=np.float64)
    return cv2.warpAffine(image, matrix, (size, size), flags=cv2.INTER_CUBIC, borderValue=0)


def reconnet_input(images: list[np.ndarray], mode: str = "reface", points: list[np.ndarray] | None = None):
    """Batch for :class:`ReconNet` in the chosen mode (see the module docstring)."""
    if mode == "reface":
        prepared = [np.asarray(Image.fromarray(im).resize((512, 512), Image.BICUBIC)) for im in images]  # as REFace
    elif mode == "aligned":
        if points is None or len(points) != len(images):
            raise ValueError("reconnet_input: mode 'aligned' needs 5 keypoints per image")
        prepared = [aligned_crop(im, pts) for im, pts in zip(images, points)]
    else:
        raise ValueError(f"reconnet_input: mode must be 'reface' or 'aligned', got {mode!r}")
    return torch.from_numpy(np.stack(prepared)).permute(0, 3, 1, 2).float() / 255.0


@torch.no_grad()
def expression_coefficients(model: ReconNet, batch: torch.Tensor) -> np.ndarray:
    """(B, 64) expression coefficients."""
    device = next(model.parameters()).device
    coefficients = model(batch.to(device)).float().cpu().numpy()
    return coefficients[:, 80:144]


def mesh_expression(mesh: np.ndarray) -> np.ndarray:
    """(7,) expression ratios from a 478-point mesh; invariant to scale, in-plane rotation and translation."""
    p = mesh.astype(np.float64)
    eye_r, eye_l = (p[33] + p[133]) / 2.0, (p[263] + p[362]) / 2.0
    iod = max(np.linalg.norm(eye_l - eye_r), 1e-6)
    axis_x = (eye_l[:2] - eye_r[:2]) / max(np.linalg.norm(eye_l[:2] - eye_r[:2]), 1e-6)
    axis_y = np.array([-axis_x[1], axis_x[0]])  # image-down direction of the face
    lip_centre = (p[13, :2] + p[14, :2]) / 2.0
    corners = (p[61, :2] + p[291, :2]) / 2.0

    def dist(a: int | np.ndarray, b: int | np.ndarray) -> float:
        pa = p[a] if isinstance(a, int) else a
        pb = p[b] if isinstance(b, int) else b
        return float(np.linalg.norm(pa - pb))

    return np.array([
        dist(13, 14) / iod, dist(61, 291) / iod,
        dist(159, 145) / max(dist(33, 133), 1e-6), dist(386, 374) / max(dist(263, 362), 1e-6),
        dist(105, eye_r) / iod, dist(334, eye_l) / iod,
        float((lip_centre - corners) @ axis_y) / iod,
    ], dtype=np.float32)
