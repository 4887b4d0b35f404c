"""The SimSwap ArcFace (ResNet with IR + SE blocks, 512-d embedding on 112x112 faces) used by the reference's
ID loss, and a one-time converter of its pickled ``arcface_checkpoint.tar`` to safetensors.

The converter never runs pickled code: it uses ``torch.load(weights_only=True)`` and maps every class global
of the pickle (SimSwap's ``models.arcface_models.*``, torch.nn layers, DataParallel, optimizers) to an inert
placeholder module, then keeps only the tensors of the ``model`` entry.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


class SqueezeExcite(nn.Module):
    """Channel attention: global pool -> bottleneck MLP (PReLU) -> sigmoid gate."""

    def __init__(self, channels: int, reduction: int = 16) -> None:
        super().__init__()
        self.avg_pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Sequential(nn.Linear(channels, channels // reduction), nn.PReLU(),
                                nn.Linear(channels // reduction, channels), nn.Sigmoid())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate = self.fc(self.avg_pool(x).flatten(1))
        return x * gate[:, :, None, None]


class IRBlock(nn.Module):
    """Pre-BN residual block: BN, 3x3 conv, BN, PReLU, 3x3 conv (stride), BN, SE, + shortcut, PReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.bn0 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, inplanes, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.prelu = nn.PReLU()
        self.conv2 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.se = SqueezeExcite(planes)
        self.downsample = None
        if stride != 1 or inplanes != planes:
            self.downsample = nn.Sequential(nn.Conv2d(inplanes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.prelu(self.bn1(self.conv1(self.bn0(x))))
        out = self.se(self.bn2(self.conv2(out)))
        shortcut = x if self.downsample is None else self.downsample(x)
        return self.prelu(out + shortcut)


class ArcFaceResNet(nn.Module):
    """SimSwap's ArcFace backbone; ``layers`` is read from the checkpoint (e.g. (3, 4, 23, 3) or (2, 2, 2, 2))."""

    def __init__(self, layers: tuple[int, int, int, int] = (3, 4, 23, 3)) -> None:
        super().__init__()
        self.layers_config = tuple(layers)
        self.conv1 = nn.Conv2d(3, 64, 3, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        self.prelu = nn.PReLU()
        self.maxpool = nn.MaxPool2d(2, 2)
        inplanes = 64
        for index, (planes, count) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if index == 0 else 2
            blocks = [IRBlock(inplanes, planes, stride)] + [IRBlock(planes, planes) for _ in range(count - 1)]
            setattr(self, f"layer{index + 1}", nn.Sequential(*blocks))
            inplanes = planes
        self.bn2 = nn.BatchNorm2d(512)
        self.dropout = nn.Dropout()
        self.fc = nn.Linear(512 * 7 * 7, 512)
        self.bn3 = nn.BatchNorm1d(512)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, 112, 112) ImageNet-normalised faces -> (B, 512) embeddings (not normalised)."""
        x = self.maxpool(self.prelu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        x = self.dropout(self.bn2(x)).flatten(1)
        return self.bn3(self.fc(x))


def layers_from_state_dict(state: dict[str, torch.Tensor]) -> tuple[int, int, int, int]:
    """Blocks per stage, counted from ``layerK.<i>.`` keys."""
    counts = []
    for stage in range(1, 5):
        indices = {int(m.group(1)) for k in state if (m := re.match(rf"layer{stage}\.(\d+)\.", k))}
        if not indices:
            raise ValueError(f"ArcFace weights: no layer{stage}.* keys; not a SimSwap ArcFace state dict")
        counts.append(max(indices) + 1)
    return tuple(counts)  # type: ignore[return-value]


def load_arcface(path: str | Path, device: str | torch.device = "cpu") -> ArcFaceResNet:
    """A frozen, eval-mode ArcFace from a ``.safetensors`` state dict (made by :func:`convert_simswap_arcface`)."""
    from safetensors.torch import load_file

    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"arcface {path}: expected a .safetensors file; convert the SimSwap pickle first with "
                         "`appleswap train convert-arcface arcface_checkpoint.tar arcface_simswap.safetensors`")
    if not path.is_file():
        raise FileNotFoundError(f"arcface weights {path} not found")
    state = load_file(str(path))
    model = ArcFaceResNet(layers_from_state_dict(state))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not k.endswith("num_batches_tracked")]
    if missing or unexpected:
        raise ValueError(f"arcface {path}: missing keys {missing[:5]}, unexpected keys {unexpected[:5]}")
    return model.to(device).eval().requires_grad_(False)


class _Inert(nn.Module):
    """Stands in for every class global of the pickle: holds the unpickled attributes, runs nothing."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__()


_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_ALLOWED_PREFIXES = ("models.", "torch.nn.", "torch.optim.", "utils.", "config.", "__main__.", "arcface")


def _load_pickle_weights_only(src: Path) -> object:
    """``torch.load(weights_only=True)`` with the pickle's class globals mapped to :class:`_Inert`."""
    import collections

    inert: list = [collections.defaultdict, collections.OrderedDict, set, dict]
    for _ in range(200):
        try:
            with torch.serialization.safe_globals(inert):
                return torch.load(src, map_location="cpu", weights_only=True)
        except Exception as error:  # the weights-only unpickler names the first unknown global
            match = _GLOBAL.search(str(error))
            if not match or not match.group(1).startswith(_ALLOWED_PREFIXES):
                raise ValueError(f"arcface {src}: cannot read it with weights_only=True ({error}). Re-save its "
                                 "state_dict in the environment that made it: see docs/training.md") from error
            name = match.group(1)
            inert.append((type(name.rsplit(".", 1)[-1], (_Inert,), {}), name))
    raise ValueError(f"arcface {src}: too many unknown globals")


def convert_simswap_arcface(src: str | Path, dst: str | Path) -> Path:
    """Read SimSwap's pickled ``arcface_checkpoint.tar`` (dict with a DataParallel ``model``, or a bare model,
    or a state dict) safely and write the backbone's state dict as safetensors; checks it loads strictly."""
    from appleswap.files import save_tensors

    src, dst = Path(src), Path(dst)
    if not src.is_file():
        raise FileNotFoundError(f"arcface checkpoint {src} not found")
    obj = _load_pickle_weights_only(src)
    if isinstance(obj, dict) and "model" in obj:
        obj = obj["model"]
    if isinstance(obj, nn.Module):
        obj = getattr(obj, "module", obj) if "module" in obj._modules else obj
        state = obj.state_dict()
    elif isinstance(obj, dict):
        state = {k.removeprefix("module."): v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    else:
        raise TypeError(f"arcface {src}: unexpected content {type(obj).__name__}")
    state = {k: v.detach().float().contiguous() for k, v in state.items() if k.split(".")[-1] != "num_batches_tracked"}
    model = ArcFaceResNet(layers_from_state_dict(state))
    model.load_state_dict(state, strict=False)
    expected = {k for k in model.state_dict() if not k.endswith("num_batches_tracked")}
    if expected != set(state):
        raise ValueError(f"arcface {src}: keys differ from the SimSwap ArcFace: missing "
                         f"{sorted(expected - set(state))[:5]}, unexpected {sorted(set(state) - expected)[:5]}")
    save_tensors(dst, state, metadata={"format": "pt", "source": src.name, "layers": str(model.layers_config)})
    log.info("wrote %s (%d tensors, layers %s)", dst, len(state), model.layers_config)
    return dst
