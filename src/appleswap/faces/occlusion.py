"""The APPLE release's occlusion-aware face segmenter (DeepLabV3+ / ResNetV1c-101) without mmcv or mmsegmentation.

The release runs ``preprocess/deeplabv3plus_celebA_train_wo_natocc_wsot.py`` through mmseg (docs/method.md): ResNetV1c
(deep stem, strides 1/2/1/1, dilations 1/1/2/4, contract_dilation), a DepthwiseSeparableASPPHead (2048->512, ASPP
dilations 1/12/24/36, c1 256->48, 2 classes) and an FCN auxiliary head. Every module here is named like mmseg's so
``deeplabv3_iter_27600.pth`` loads strictly (``backbone.stem.*``, ``backbone.layerN.*``, ``decode_head.*``, mmcv
ConvModule ``conv``/``bn``, DepthwiseSeparableConvModule ``depthwise_conv``/``pointwise_conv``). The auxiliary head
is training-only: its ``auxiliary_head.*`` keys are skipped explicitly (and counted in the log).

Checkpoints are read with ``torch.load(weights_only=True)``. mmcv/mmengine checkpoints also carry ``meta``,
``optimizer`` and ``message_hub`` entries that may pickle numpy scalars or library classes; weights_only refuses
those, so the loader substitutes an inert, data-only placeholder for each such class (nothing from the file is ever
executed) and keeps only the tensors. :func:`convert_checkpoint` writes a safetensors copy once.

Test-time pipeline (class 1 = visible face): keep-ratio resize into 512x512 (cv2 bilinear), resize up to a multiple
of 32, mean (123.675, 116.28, 103.53) / std (58.395, 57.12, 57.375) on RGB, logits resized bilinearly
(align_corners=False) to the input and then to the original size, argmax. ``flip``: ``"none"`` (default, one plain
view), ``"average"`` (plain + mirrored view, softmax averaged) or ``"only"`` (parity: the release's patched mmcv keeps
only the last augmented view, a horizontally flipped image whose logits are flipped back). The reference then
scales the {0, 1} prediction to {0, 255} and resizes it bilinearly to H x H before thresholding at > 0: for the
square 512 dataset images that is the identity, so the mask here is returned at the input's own (H, W) instead
(the H x H squash would distort non-square photos). Differences left: the reference decodes JPEGs with OpenCV,
appleswap with PIL (a few grey levels on some pixels).
"""

from __future__ import annotations

import dataclasses
import logging
import pickle
from pathlib import Path

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from appleswap.faces.parsing import _check_rgb, _default_device, load_strict, read_state_dict, unwrap_state_dict

logger = logging.getLogger(__name__)

MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)
SCALE = (512, 512)
SIZE_DIVISOR = 32
FLIP_MODES = ("none", "average", "only")
AUX_PREFIX = "auxiliary_head."


@dataclasses.dataclass(frozen=True)
class DeepLabConfig:
    """Architecture of the released model; smaller values only for tests (key names stay the same)."""

    stage_blocks: tuple[int, ...] = (3, 4, 23, 3)  # ResNet-101
    stem_channels: int = 64
    base_channels: int = 64
    strides: tuple[int, ...] = (1, 2, 1, 1)
    dilations: tuple[int, ...] = (1, 1, 2, 4)
    channels: int = 512
    aspp_dilations: tuple[int, ...] = (1, 12, 24, 36)
    c1_channels: int = 48
    num_classes: int = 2


# ---- mmcv-named building blocks
class ConvModule(nn.Module):
    """conv (no bias) -> BN -> optional ReLU, named ``conv``/``bn`` like mmcv's ConvModule."""

    def __init__(self, in_ch: int, out_ch: int, kernel: int, padding: int = 0, dilation: int = 1,
                 groups: int = 1, act: bool = True) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, kernel, 1, padding, dilation, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(out_ch)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.bn(self.conv(x))
        return F.relu(x) if self.act else x


class SeparableConvModule(nn.Module):
    """mmcv DepthwiseSeparableConvModule: depthwise 3x3 ConvModule then pointwise 1x1 ConvModule, both BN+ReLU."""

    def __init__(self, in_ch: int, out_ch: int, padding: int = 1, dilation: int = 1) -> None:
        super().__init__()
        self.depthwise_conv = ConvModule(in_ch, in_ch, 3, padding, dilation, groups=in_ch)
        self.pointwise_conv = ConvModule(in_ch, out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pointwise_conv(self.depthwise_conv(x))


class Bottleneck(nn.Module):
    """mmseg ResNet Bottleneck, pytorch style (stride on the 3x3 conv)."""

    expansion = 4

    def __init__(self, in_ch: int, planes: int, stride: int, dilation: int, downsample: bool) -> None:
        super().__init__()
        out_ch = planes * self.expansion
        self.conv1 = nn.Conv2d(in_ch, planes, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride, dilation, dilation, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_ch, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(out_ch)
        self.downsample = (nn.Sequential(nn.Conv2d(in_ch, out_ch, 1, stride, bias=False), nn.BatchNorm2d(out_ch))
                           if downsample else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNetV1c(nn.Module):
    """ResNet with the 3-conv deep stem; returns the output of every stage."""

    def __init__(self, cfg: DeepLabConfig) -> None:
        super().__init__()
        half = cfg.stem_channels // 2
        self.stem = nn.Sequential(
            nn.Conv2d(3, half, 3, 2, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, half, 3, 1, 1, bias=False), nn.BatchNorm2d(half), nn.ReLU(inplace=True),
            nn.Conv2d(half, cfg.stem_channels, 3, 1, 1, bias=False), nn.BatchNorm2d(cfg.stem_channels),
            nn.ReLU(inplace=True),
        )
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        in_ch = cfg.stem_channels
        self.stage_names = []
        for index, blocks in enumerate(cfg.stage_blocks):
            planes = cfg.base_channels * 2**index
            stride, dilation = cfg.strides[index], cfg.dilations[index]
            first_dilation = dilation // 2 if dilation > 1 else dilation  # contract_dilation=True
            layer = [Bottleneck(in_ch, planes, stride, first_dilation,
                                downsample=stride != 1 or in_ch != planes * Bottleneck.expansion)]
            in_ch = planes * Bottleneck.expansion
            layer += [Bottleneck(in_ch, planes, 1, dilation, downsample=False) for _ in range(blocks - 1)]
            self.add_module(f"layer{index + 1}", nn.Sequential(*layer))
            self.stage_names.append(f"layer{index + 1}")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.maxpool(self.stem(x))
        outs = []
        for name in self.stage_names:
            x = getattr(self, name)(x)
            outs.append(x)
        return outs


class SeparableASPPHead(nn.Module):
    """mmseg DepthwiseSeparableASPPHead (DeepLabV3+ decoder) at inference."""

    def __init__(self, cfg: DeepLabConfig) -> None:
        super().__init__()
        in_ch = cfg.base_channels * 2 ** (len(cfg.stage_blocks) - 1) * Bottleneck.expansion
        c1_in = cfg.base_channels * Bottleneck.expansion
        ch = cfg.channels
        self.image_pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), ConvModule(in_ch, ch, 1))
        self.aspp_modules = nn.ModuleList(
            ConvModule(in_ch, ch, 1) if d == 1 else SeparableConvModule(in_ch, ch, padding=d, dilation=d)
            for d in cfg.aspp_dilations
        )
        self.bottleneck = ConvModule((len(cfg.aspp_dilations) + 1) * ch, ch, 3, padding=1)
        self.c1_bottleneck = ConvModule(c1_in, cfg.c1_channels, 1)
        self.sep_bottleneck = nn.Sequential(SeparableConvModule(ch + cfg.c1_channels, ch),
                                            SeparableConvModule(ch, ch))
        self.conv_seg = nn.Conv2d(ch, cfg.num_classes, 1)

    def forward(self, feats: list[torch.Tensor]) -> torch.Tensor:
        x = feats[-1]
        pooled = F.interpolate(self.image_pool(x), x.shape[2:], mode="bilinear", align_corners=False)
        out = self.bottleneck(torch.cat([pooled] + [m(x) for m in self.aspp_modules], dim=1))
        c1 = self.c1_bottleneck(feats[0])
        out = F.interpolate(out, c1.shape[2:], mode="bilinear", align_corners=False)
        return self.conv_seg(self.sep_bottleneck(torch.cat([out, c1], dim=1)))  # dropout is identity in eval


class DeepLabV3Plus(nn.Module):
    """mmseg EncoderDecoder(backbone, decode_head); returns logits at 1/4 resolution."""

    def __init__(self, cfg: DeepLabConfig = DeepLabConfig()) -> None:
        super().__init__()
        self.backbone = ResNetV1c(cfg)
        self.decode_head = SeparableASPPHead(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decode_head(self.backbone(x))


# ---- checkpoint reading
class _InertObject:
    """Stands in for a class pickled in checkpoint metadata; only stores the data it is given, runs nothing."""

    def __init__(self, *args, **kwargs) -> None:
        self.args, self.kwargs = args, kwargs

    def __setstate__(self, state) -> None:
        self.state = state


def _inert_globals(path: Path) -> list[tuple[type, str]]:
    names = torch.serialization.get_unsafe_globals_in_checkpoint(str(path))
    return [(type(f"Inert[{name}]", (_InertObject,), {}), name) for name in names]


def read_mmseg_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The ``state_dict`` tensors of an mmcv/mmengine checkpoint, loaded with ``weights_only=True``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"occlusion checkpoint not found: {path}")
    if path.suffix == ".safetensors":
        return read_state_dict(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:  # non-tensor metadata (numpy scalars, mmengine classes...)
        inert = _inert_globals(path)
        if not inert:
            raise ValueError(f"{path}: cannot read the checkpoint safely ({error})") from error
        logger.info("%s: metadata pickles %d non-tensor types; reading them as inert data: %s",
                    path.name, len(inert), ", ".join(name for _, name in inert))
        with torch.serialization.safe_globals(inert):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    return unwrap_state_dict(obj, path)


def convert_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """Write the model tensors of ``src`` (mmseg ``.pth``) to ``dst`` (``.safetensors``), aux head included."""
    from safetensors.torch import save_file

    from appleswap.files import atomic_path

    state = {k: v.contiguous() for k, v in read_mmseg_checkpoint(src).items()}
    dst = Path(dst)
    with atomic_path(dst) as tmp:
        save_file(state, str(tmp), metadata={"source": Path(src).name, "format": "mmseg-deeplabv3plus"})
    return dst


# ---- the public segmenter
class OcclusionSegmenter:
    """Which pixels show the face itself (not hands, microphones, hair, glasses frames... in front of it)."""

    def __init__(self, net: DeepLabV3Plus, device: torch.device, flip: str = "none") -> None:
        if flip not in FLIP_MODES:
            raise ValueError(f"flip must be one of {FLIP_MODES}, got {flip!r}")
        self.net = net.eval().to(device)
        self.device = device
        self.flip = flip
        self._mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_file(cls, path: str | Path, device: str | torch.device | None = None, flip: str = "none",
                  config: DeepLabConfig | None = None) -> OcclusionSegmenter:
        """Load ``deeplabv3_iter_27600.pth`` (or its safetensors conversion); ``flip="only"`` is the parity mode."""
        path = Path(path)
        state = read_mmseg_checkpoint(path)
        aux = [k for k in state if k.startswith(AUX_PREFIX)]
        state = {k: v for k, v in state.items() if not k.startswith(AUX_PREFIX)}
        net = DeepLabV3Plus(config or DeepLabConfig())
        load_strict(net, state, path, "DeepLabV3+ ResNetV1c occlusion (mmseg)")
        device = torch.device(device) if device is not None else _default_device()
        logger.info("occlusion model %s loaded on %s (skipped %d auxiliary-head tensors, flip=%s)",
                    path.name, device, len(aux), flip)
        return cls(net, device, flip=flip)

    def prepare(self, image: np.ndarray, mirrored: bool) -> torch.Tensor:
        """RGB uint8 -> normalised (1, 3, h, w) input: keep-ratio resize into 512, optional mirror, multiple of 32."""
        h, w = image.shape[:2]
        factor = min(max(SCALE) / max(h, w), min(SCALE) / min(h, w))
        size = (int(w * factor + 0.5), int(h * factor + 0.5))
        image = cv2.resize(image, size, interpolation=cv2.INTER_LINEAR)
        if mirrored:
            image = image[:, ::-1]
        padded = tuple(int(np.ceil(s / SIZE_DIVISOR)) * SIZE_DIVISOR for s in size)
        if padded != size:
            image = cv2.resize(np.ascontiguousarray(image), padded, interpolation=cv2.INTER_LINEAR)
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device, torch.float32)
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def probabilities(self, image: np.ndarray, bgr: bool = False) -> torch.Tensor:
        """(2, H, W) class scores at the image's size: logits (one view) or softmax average (``flip="average"``)."""
        _check_rgb(image, "image")
        if bgr:
            image = image[..., ::-1]
        views = {"none": [False], "only": [True], "average": [False, True]}[self.flip]
        outputs = []
        for mirrored in views:
            x = self.prepare(image, mirrored)
            logits = F.interpolate(self.net(x), x.shape[2:], mode="bilinear", align_corners=False)
            if mirrored:
                logits = logits.flip(dims=(3,))
            outputs.append(logits)
        scores = outputs[0] if len(outputs) == 1 else torch.stack([o.softmax(dim=1) for o in outputs]).mean(0)
        return F.interpolate(scores, image.shape[:2], mode="bilinear", align_corners=False)[0]

    def visible(self, image: np.ndarray, bgr: bool = False) -> np.ndarray:
        """(H, W) bool: True where the face is visible (class 1). ``bgr=True`` if the array is OpenCV BGR."""
        return (self.probabilities(image, bgr=bgr).argmax(dim=0) == 1).cpu().numpy()

    def visible_batch(self, images: list[np.ndarray], bgr: bool = False) -> list[np.ndarray]:
        return [self.visible(image, bgr=bgr) for image in images]
