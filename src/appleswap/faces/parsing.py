"""BiSeNet 19-class CelebAMask-HQ face parser in plain PyTorch, loaded from local weights (docs/method.md).

Architecture: ResNet-18 context path, two attention-refinement modules, a feature-fusion module that takes the
ResNet 1/8 feature in place of the (removed) spatial path, and three output heads (only the main one is used at
inference). Parameter names follow ``zllrunning/face-parsing.PyTorch`` (``79999_iter.pth``, the APPLE release's
``FaceParser.pth``) and ``xinntao/facexlib`` (``parsing_bisenet.pth``, used by PuLID): the two codebases name every
parameter identically (``cp.resnet.*``, ``cp.arm16.*``, ``ffm.*``, ``conv_out.*``...), so one module loads both.
Containers differ, so the loader accepts a bare state dict, ``{'state_dict': ...}`` / ``{'params': ...}`` wrappers,
a ``module.`` (DataParallel) prefix, checkpoints saved before BatchNorm had ``num_batches_tracked``, and
``.safetensors``.

Input normalisation. The correct input is ImageNet mean/std normalisation (what the model was trained with, and what
facexlib/PuLID use). The APPLE condition script normalises a *second* time with ``(x - 0.5) / 0.5`` (``SpecificNorm``);
``parity_double_norm=True`` reproduces that. **Which to use:** to rebuild conditions that match the released APPLE
teacher/student (trained on masks made with the quirk) pass ``parity_double_norm=True``; for everything else
(new datasets, the swap app, PuLID-style parsing) keep the default ``False``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from appleswap.faces.segmap import CLASS_NAMES

logger = logging.getLogger(__name__)

NUM_CLASSES = len(CLASS_NAMES)  # 19
INPUT_SIZE = 512
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
_WRAPPER_KEYS = ("state_dict", "params_ema", "params", "model", "net")


# ---- building blocks (names match the reference checkpoints)
class ConvBNReLU(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, kernel: int = 3, stride: int = 1, padding: int = 1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, stride, padding, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.bn(self.conv(x)))


class BasicBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.downsample = None
        if in_ch != out_ch or stride != 1:
            self.downsample = nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        shortcut = x if self.downsample is None else self.downsample(x)
        return F.relu(shortcut + residual)


def _basic_layer(in_ch: int, out_ch: int, stride: int) -> nn.Sequential:
    return nn.Sequential(BasicBlock(in_ch, out_ch, stride), BasicBlock(out_ch, out_ch, 1))


class ResNet18(nn.Module):
    """ResNet-18 trunk returning the 1/8, 1/16 and 1/32 features."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 64, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        self.layer1 = _basic_layer(64, 64, 1)
        self.layer2 = _basic_layer(64, 128, 2)
        self.layer3 = _basic_layer(128, 256, 2)
        self.layer4 = _basic_layer(256, 512, 2)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        x = self.layer1(self.maxpool(F.relu(self.bn1(self.conv1(x)))))
        feat8 = self.layer2(x)
        feat16 = self.layer3(feat8)
        return feat8, feat16, self.layer4(feat16)


class AttentionRefinement(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, out_ch)
        self.conv_atten = nn.Conv2d(out_ch, out_ch, 1, bias=False)
        self.bn_atten = nn.BatchNorm2d(out_ch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat = self.conv(x)
        attention = torch.sigmoid(self.bn_atten(self.conv_atten(feat.mean(dim=(2, 3), keepdim=True))))
        return feat * attention


class ContextPath(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.resnet = ResNet18()
        self.arm16 = AttentionRefinement(256, 128)
        self.arm32 = AttentionRefinement(512, 128)
        self.conv_head32 = ConvBNReLU(128, 128)
        self.conv_head16 = ConvBNReLU(128, 128)
        self.conv_avg = ConvBNReLU(512, 128, kernel=1, padding=0)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        feat8, feat16, feat32 = self.resnet(x)
        global_context = self.conv_avg(feat32.mean(dim=(2, 3), keepdim=True))
        feat32_sum = self.arm32(feat32) + global_context  # broadcast == nearest upsampling of a 1x1 map
        feat32_up = self.conv_head32(F.interpolate(feat32_sum, feat16.shape[2:], mode="nearest"))
        feat16_sum = self.arm16(feat16) + feat32_up
        feat16_up = self.conv_head16(F.interpolate(feat16_sum, feat8.shape[2:], mode="nearest"))
        return feat8, feat16_up, feat32_up


class FeatureFusion(nn.Module):
    def __init__(self, in_ch: int, out_ch: int) -> None:
        super().__init__()
        self.convblk = ConvBNReLU(in_ch, out_ch, kernel=1, padding=0)
        self.conv1 = nn.Conv2d(out_ch, out_ch // 4, 1, bias=False)
        self.conv2 = nn.Conv2d(out_ch // 4, out_ch, 1, bias=False)

    def forward(self, spatial: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        feat = self.convblk(torch.cat([spatial, context], dim=1))
        attention = torch.sigmoid(self.conv2(F.relu(self.conv1(feat.mean(dim=(2, 3), keepdim=True)))))
        return feat * attention + feat


class OutputHead(nn.Module):
    def __init__(self, in_ch: int, mid_ch: int, num_classes: int) -> None:
        super().__init__()
        self.conv = ConvBNReLU(in_ch, mid_ch)
        self.conv_out = nn.Conv2d(mid_ch, num_classes, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_out(self.conv(x))


class BiSeNet(nn.Module):
    """The face parser; ``forward`` returns the main head's logits at input resolution (the 16/32 heads are
    training-only auxiliaries, kept so their weights load strictly)."""

    def __init__(self, num_classes: int = NUM_CLASSES) -> None:
        super().__init__()
        self.cp = ContextPath()
        self.ffm = FeatureFusion(256, 256)
        self.conv_out = OutputHead(256, 256, num_classes)
        self.conv_out16 = OutputHead(128, 64, num_classes)
        self.conv_out32 = OutputHead(128, 64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        feat8, context8, _ = self.cp(x)
        logits = self.conv_out(self.ffm(feat8, context8))
        return F.interpolate(logits, x.shape[2:], mode="bilinear", align_corners=True)


# ---- checkpoint reading shared by the segmenters
def unwrap_state_dict(obj: object, path: Path) -> dict[str, torch.Tensor]:
    """Find the tensor dict inside a training checkpoint and strip a DataParallel ``module.`` prefix."""
    if isinstance(obj, Mapping):
        for key in _WRAPPER_KEYS:
            if key in obj and isinstance(obj[key], Mapping):
                return unwrap_state_dict(obj[key], path)
    if not isinstance(obj, Mapping) or not obj:
        raise ValueError(f"{path}: no state dict found (got {type(obj).__name__})")
    state = {str(k): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not state:
        raise ValueError(f"{path}: the checkpoint holds no tensors (keys: {list(obj)[:8]})")
    if all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    return state


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a ``.safetensors`` file or a ``.pth`` loaded with ``weights_only=True`` (no pickle code runs)."""
    from appleswap.files import read_tensor_file

    path = Path(path)
    state = read_tensor_file(path, "face-parser checkpoint")
    return state if path.suffix == ".safetensors" else unwrap_state_dict(state, path)


def load_strict(module: nn.Module, state: Mapping[str, torch.Tensor], path: Path, what: str) -> None:
    """Load every parameter or fail with one message listing missing/unexpected keys and shape mismatches.

    ``num_batches_tracked`` counters are optional (old checkpoints lack them; inference never reads them).
    """
    own = module.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
              for k in own if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{path} is not a {what} checkpoint:"]
        for label, items in (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes)):
            if items:
                parts.append(f"  {len(items)} {label}: {', '.join(items[:10])}" + (" ..." if len(items) > 10 else ""))
        raise ValueError("\n".join(parts))
    filled = {k: state.get(k, own[k]) for k in own}
    module.load_state_dict(filled, strict=True)


def detect_layout(state: Mapping[str, torch.Tensor]) -> str:
    """Name the checkpoint family from its keys: BiSeNet (face-parsing.PyTorch / facexlib) or unknown."""
    if "cp.resnet.conv1.weight" in state and "ffm.convblk.conv.weight" in state:
        return "bisenet"
    if any(k.startswith(("backbone.", "decode_head.")) for k in state):
        return "mmseg"
    return "unknown"


# ---- the public parser
class FaceParser:
    """19-class face parsing of RGB uint8 images; class ids follow :mod:`appleswap.faces.segmap`."""

    def __init__(self, net: BiSeNet, device: torch.device, parity_double_norm: bool = False,
                 input_size: int = INPUT_SIZE) -> None:
        if input_size % 32:
            raise ValueError(f"input_size must be a multiple of 32, got {input_size}")
        self.net = net.eval().to(device)
        self.device = device
        self.parity_double_norm = parity_double_norm
        self.input_size = input_size
        self._mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device | None = None,
                  parity_double_norm: bool | None = None, input_size: int = INPUT_SIZE) -> FaceParser:
        """Load ``FaceParser.pth`` / ``79999_iter.pth`` / facexlib ``parsing_bisenet.pth`` (or a safetensors copy).

        ``parity_double_norm=None`` means the correct default (single ImageNet normalisation); see the module doc.
        ``input_size`` is the square network resolution (512 as trained and in the reference).
        """
        path = Path(path)
        state = read_state_dict(path)
        layout = detect_layout(state)
        if layout != "bisenet":
            raise ValueError(f"{path}: not a BiSeNet face-parsing checkpoint (looks like: {layout}; "
                             f"first keys: {sorted(state)[:5]})")
        net = BiSeNet(NUM_CLASSES)
        load_strict(net, state, path, "BiSeNet 19-class face-parsing")
        device = torch.device(device) if device is not None else _default_device()
        logger.info("face parser %s loaded on %s (double norm: %s)", path.name, device, bool(parity_double_norm))
        return cls(net, device, parity_double_norm=bool(parity_double_norm), input_size=input_size)

    def preprocess(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """RGB uint8 images -> (B, 3, S, S) network input, S = input_size (PIL bilinear, as the reference)."""
        batch = []
        for index, image in enumerate(images):
            _check_rgb(image, f"images[{index}]")
            if image.shape[:2] != (self.input_size, self.input_size):
                image = np.array(Image.fromarray(image).resize((self.input_size,) * 2, Image.BILINEAR))
            batch.append(torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1))
        x = torch.stack(batch).to(self.device, torch.float32) / 255.0
        x = (x - self._mean) / self._std
        if self.parity_double_norm:  # SpecificNorm of the APPLE condition script (docs/method.md: Preprocessing)
            x = (x - 0.5) / 0.5
        return x

    @torch.inference_mode()
    def logits_batch(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 19, S, S) float logits of the main head."""
        return self.net(self.preprocess(images))

    @torch.inference_mode()
    def parse_batch(self, images: Sequence[np.ndarray]) -> list[np.ndarray]:
        """Class maps (H, W) uint8 at each image's own size (logits resized bilinearly before the argmax)."""
        if len(images) == 0:
            return []
        logits = self.logits_batch(images)
        out = []
        for image, logit in zip(images, logits):
            if image.shape[:2] != logit.shape[1:]:
                logit = F.interpolate(logit[None], image.shape[:2], mode="bilinear", align_corners=False)[0]
            out.append(logit.argmax(dim=0).to(torch.uint8).cpu().numpy())
        return out

    def parse(self, image: np.ndarray) -> np.ndarray:
        """(H, W) uint8 class ids of one RGB uint8 (H, W, 3) image."""
        return self.parse_batch([image])[0]


def _check_rgb(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        got = f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}"
        raise ValueError(f"{name}: expected an RGB uint8 array of shape (H, W, 3), got {got}")


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")
