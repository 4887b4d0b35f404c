"""Losses of the teacher and the student (docs/method.md): logit-normal t, flow matching, and the ArcFace ID loss
and LPIPS-VGG on the one-step x0 estimate, each applied only to samples with small t."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
# Face box of an FFHQ-aligned crop as fractions of its side (pSp's [35:223, 32:220] of 256): the ID net sees the
# face, not the whole frame (the reference fed the full 512 frame, nearest-resized, to ArcFace).
FACE_BOX = (35 / 256, 223 / 256, 32 / 256, 220 / 256)


def sample_timesteps(batch: int, *, mean: float = 0.0, std: float = 1.0, generator: torch.Generator | None = None,
                     device: torch.device | str = "cpu") -> torch.Tensor:
    """t = sigmoid(n), n ~ N(mean, std): one value per sample in (0, 1), t = 1 is pure noise."""
    noise = torch.randn(batch, generator=generator, device=generator.device if generator else device)
    return torch.sigmoid(noise * std + mean).to(device)


def _expand(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def noisy_latents(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """x_t = (1 - t) x0 + t noise."""
    t = _expand(t, x0)
    return (1 - t) * x0 + t * noise


def flow_matching_loss(velocity: torch.Tensor, noise: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    """MSE between the predicted velocity and the target eps - x0, over all elements (unweighted)."""
    return F.mse_loss(velocity.float(), (noise - x0).float())


def predicted_x0(x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor) -> torch.Tensor:
    """One-step clean estimate x0_hat = x_t - t v."""
    return x_t - _expand(t, x_t) * velocity


def gated_mean(per_sample: torch.Tensor, t: torch.Tensor, max_t: float) -> torch.Tensor:
    """Mean of ``per_sample`` over samples with t <= max_t (0 with a graph when none qualifies)."""
    mask = (t <= max_t).to(per_sample.dtype)
    return (per_sample * mask).sum() / mask.sum().clamp(min=1.0)


def crop_face(images: torch.Tensor, size: int) -> torch.Tensor:
    """Face box of aligned crops, resized (bilinear, antialiased) to ``size``."""
    h, w = images.shape[-2:]
    top, bottom, left, right = FACE_BOX
    crop = images[..., round(top * h):round(bottom * h), round(left * w):round(right * w)]
    return F.interpolate(crop, size=(size, size), mode="bilinear", align_corners=False, antialias=True)


class IdentityLoss(nn.Module):
    """Per-sample 1 - cos(f(source), f(image)) with a frozen face-recognition net on the face box."""

    def __init__(self, net: nn.Module, *, input_size: int = 112, imagenet_norm: bool = True) -> None:
        super().__init__()
        self.net = net.eval().requires_grad_(False)
        self.input_size = input_size
        mean, std = (IMAGENET_MEAN, IMAGENET_STD) if imagenet_norm else ((0.5,) * 3, (0.5,) * 3)
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> L2-normalised embeddings."""
        faces = crop_face(images.clamp(0, 1).float(), self.input_size)
        dtype = next(self.net.parameters()).dtype
        return F.normalize(self.net(((faces - self.mean) / self.std).to(dtype)).float(), dim=-1)

    def forward(self, images: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            reference = self.embed(sources)
        return 1.0 - (self.embed(images) * reference).sum(-1)


def build_identity_loss(kind: str, weights: Path, device: str | torch.device = "cpu") -> IdentityLoss:
    """The ID loss on SimSwap's ArcFace (``arcface``, the paper's) or on IR-SE50 (``irse50``, pSp layout)."""
    if kind == "arcface":
        from appleswap.train.arcface import load_arcface

        return IdentityLoss(load_arcface(weights, device), imagenet_norm=True).to(device)
    if kind == "irse50":
        from appleswap.face_metrics.arcface import load_irse50

        return IdentityLoss(load_irse50(weights, device), imagenet_norm=False).to(device)
    raise ValueError(f"id_loss: unknown network {kind!r} (use arcface, irse50 or none)")


def load_vgg16_features(path: Path) -> dict[str, torch.Tensor]:
    """``features.*`` tensors of a torchvision vgg16 file (.pth state dict or .safetensors)."""
    from appleswap.files import read_tensor_file

    state = read_tensor_file(path, "vgg16 weights")
    features = {k.removeprefix("features."): v for k, v in state.items() if k.startswith("features.")}
    if not features:
        raise ValueError(f"vgg16 weights {path}: no 'features.*' keys (expected torchvision's vgg16 state dict)")
    return features


def build_lpips(vgg16_path: Path, device: str | torch.device = "cpu") -> nn.Module:
    """Frozen LPIPS-VGG (v0.1) without any download: the VGG16 trunk from a local torchvision file, the linear
    heads from the lpips package's own ``weights/v0.1/vgg.pth``."""
    import warnings

    import lpips

    with warnings.catch_warnings():  # lpips builds torchvision's VGG with the pre-0.13 `pretrained=` argument
        warnings.filterwarnings("ignore", category=UserWarning, module="torchvision.models._utils")
        model = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    features = load_vgg16_features(vgg16_path)
    trunk = {}
    for name, _ in model.net.named_parameters():
        _, index, kind = name.split(".")
        trunk[name] = features[f"{index}.{kind}"]
    model.net.load_state_dict(trunk, strict=True)
    heads = Path(lpips.__file__).parent / "weights" / "v0.1" / "vgg.pth"
    model.load_state_dict(torch.load(heads, map_location="cpu", weights_only=True), strict=False)
    return model.to(device).eval().requires_grad_(False)
