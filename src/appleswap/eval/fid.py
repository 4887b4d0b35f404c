"""FID and KID with pytorch-fid's InceptionV3 (pool3, 2048-d) built from a local weight file.

pytorch-fid would download ``pt_inception-2015-12-05-6726825d.pth``; here the same network (torchvision
Inception v3 with pytorch-fid's FID blocks) is assembled and the file comes from the weights registry, so the
numbers match ``python -m pytorch_fid`` for the same images. Per-image features are cached by the runner, which
makes a reference folder (e.g. FFHQ images512) a one-off cost.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from appleswap.files import read_tensor_file

log = logging.getLogger(__name__)

VERSION = "fid-inception-pool3-1"


class FIDInception(nn.Module):
    """pytorch-fid's FID InceptionV3 up to the pool3 features; input RGB in [0, 1], any size."""

    def __init__(self) -> None:
        super().__init__()
        from pytorch_fid.inception import FIDInceptionA, FIDInceptionC, FIDInceptionE_1, FIDInceptionE_2, _inception_v3

        net = _inception_v3(num_classes=1008, aux_logits=False, weights=None)
        net.Mixed_5b, net.Mixed_5c = FIDInceptionA(192, pool_features=32), FIDInceptionA(256, pool_features=64)
        net.Mixed_5d = FIDInceptionA(288, pool_features=64)
        net.Mixed_6b, net.Mixed_6c = FIDInceptionC(768, channels_7x7=128), FIDInceptionC(768, channels_7x7=160)
        net.Mixed_6d, net.Mixed_6e = FIDInceptionC(768, channels_7x7=160), FIDInceptionC(768, channels_7x7=192)
        net.Mixed_7b, net.Mixed_7c = FIDInceptionE_1(1280), FIDInceptionE_2(2048)
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 2048) pool3 activations (bilinear resize to 299, scale to [-1, 1])."""
        n = self.net
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False) * 2.0 - 1.0
        x = F.max_pool2d(n.Conv2d_2b_3x3(n.Conv2d_2a_3x3(n.Conv2d_1a_3x3(x))), kernel_size=3, stride=2)
        x = F.max_pool2d(n.Conv2d_4a_3x3(n.Conv2d_3b_1x1(x)), kernel_size=3, stride=2)
        for name in ("Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
                     "Mixed_7a", "Mixed_7b", "Mixed_7c"):
            x = getattr(n, name)(x)
        return torch.flatten(F.adaptive_avg_pool2d(x, (1, 1)), 1)


def load_fid_inception(path: str | Path, device: str | torch.device = "cpu") -> FIDInception:
    """FIDInception with ``pt_inception-2015-12-05-6726825d.pth`` (or a safetensors copy) loaded strictly."""
    state = read_tensor_file(path, "FID Inception weights")
    model = FIDInception()
    model.net.load_state_dict(state, strict=True)
    return model.eval().requires_grad_(False).to(device)


@torch.no_grad()
def inception_features(model: FIDInception, images: list[np.ndarray]) -> np.ndarray:
    """(B, 2048) float32 pool3 features of uint8 RGB images (each image resized on its own, like pytorch-fid)."""
    device = next(model.parameters()).device
    batch = torch.cat([F.interpolate(torch.from_numpy(im).permute(2, 0, 1).float()[None] / 255.0, size=(299, 299),
                                     mode="bilinear", align_corners=False) for im in images])
    return model(batch.to(device)).float().cpu().numpy()


def reference_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance of a reference set, computed once and reused across bootstrap resamples."""
    features = np.asarray(features, np.float64)
    if len(features) < 2:
        raise ValueError(f"FID needs at least 2 reference images, got {len(features)}")
    return features.mean(axis=0), np.cov(features, rowvar=False)


def _trace_sqrt_product(centred_a: np.ndarray, sigma_b: np.ndarray) -> float:
    """Tr((S_a S_b)^(1/2)) with S_a = X_a^T X_a / (n_a - 1), without a general matrix square root.

    S_a S_b has the non-zero eigenvalues of X_a S_b X_a^T / (n_a - 1), an n_a x n_a symmetric problem when the set
    is smaller than the feature dimension (1,000 swaps vs 2,048); otherwise the d x d route through S_a^(1/2).
    Both are exact and much faster than scipy's sqrtm.
    """
    n_a, dim = centred_a.shape
    if n_a - 1 < dim:
        eigenvalues = np.linalg.eigvalsh(centred_a @ sigma_b @ centred_a.T / (n_a - 1))
    else:
        values, vectors = np.linalg.eigh(centred_a.T @ centred_a / (n_a - 1))
        root_a = (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T
        eigenvalues = np.linalg.eigvalsh(root_a @ sigma_b @ root_a)
    return float(np.sqrt(np.clip(eigenvalues, 0, None)).sum())


def frechet_from_statistics(features_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray) -> float:
    """FID of a feature set against reference statistics: |mu_a - mu_b|^2 + Tr(S_a + S_b - 2 (S_a S_b)^(1/2))."""
    features_a = np.asarray(features_a, np.float64)
    if len(features_a) < 2:
        raise ValueError(f"FID needs at least 2 images, got {len(features_a)}")
    mu_a = features_a.mean(axis=0)
    centred_a = features_a - mu_a
    trace_a = float((centred_a**2).sum() / (len(features_a) - 1))
    diff = mu_a - mu_b
    return float(diff @ diff + trace_a + np.trace(sigma_b) - 2.0 * _trace_sqrt_product(centred_a, sigma_b))


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """FID between two feature sets (pytorch-fid's formula, without its sqrtm)."""
    return frechet_from_statistics(features_a, *reference_statistics(features_b))


def kernel_inception_distance(features_a: np.ndarray, features_b: np.ndarray, *, subsets: int = 100,
                              subset_size: int = 1000, seed: int = 0) -> float:
    """Unbiased MMD^2 with the cubic polynomial kernel, averaged over random subsets (reliable for small sets)."""
    count = min(len(features_a), len(features_b), subset_size)
    if count < 2:
        raise ValueError("KID needs at least 2 images per set")
    dim = features_a.shape[1]
    rng = np.random.default_rng(seed)
    values = []
    for _ in range(subsets):
        x = features_a[rng.choice(len(features_a), count, replace=False)]
        y = features_b[rng.choice(len(features_b), count, replace=False)]
        kxx, kyy, kxy = ((x @ x.T) / dim + 1) ** 3, ((y @ y.T) / dim + 1) ** 3, ((x @ y.T) / dim + 1) ** 3
        off = count * (count - 1)
        values.append((kxx.sum() - np.trace(kxx)) / off + (kyy.sum() - np.trace(kyy)) / off - 2 * kxy.mean())
    return float(np.mean(values))
