"""Robust file I/O shared by every stage: image decoding with clear errors, and atomic writes.

Every writer goes through a temporary file in the same folder followed by ``os.replace``, so a killed job never
leaves a half-written output behind (resumable stages rely on "file exists" meaning "file is complete").
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageOps

if TYPE_CHECKING:
    import torch

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".tif", ".tiff")
MAX_IMAGE_PIXELS = 100_000_000  # 100 MP; larger files are refused as possible decompression bombs
MIN_IMAGE_SIDE = 64


class ImageLoadError(ValueError):
    """An input file is not a usable photo; the message says why and names the file."""


def is_image_path(path: str | Path) -> bool:
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def load_image(path: str | Path, *, max_pixels: int = MAX_IMAGE_PIXELS, min_side: int = MIN_IMAGE_SIDE) -> np.ndarray:
    """Decode any photo to an 8-bit RGB array of shape (H, W, 3).

    Applies the EXIF orientation, flattens alpha onto white, converts grayscale / 16-bit / CMYK / palette
    images, and raises :class:`ImageLoadError` (naming the file) for missing, corrupt, truncated, non-image,
    decompression-bomb sized or tiny inputs.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageLoadError(f"{path}: no such file")
    try:
        with Image.open(path) as probe:
            width, height = probe.size
        if width * height > max_pixels:
            raise ImageLoadError(
                f"{path}: {width}x{height} is {width * height / 1e6:.0f} MP, over the {max_pixels / 1e6:.0f} MP limit "
                "(possible decompression bomb); downscale it first"
            )
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
            array = _to_rgb8(image)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as error:
        raise ImageLoadError(f"{path}: refused as a decompression bomb ({error})") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise ImageLoadError(f"{path}: not a readable image ({error})") from error
    if min(array.shape[:2]) < min_side:
        raise ImageLoadError(f"{path}: {array.shape[1]}x{array.shape[0]} is too small (shorter side < {min_side} px)")
    return array


def _to_rgb8(image: Image.Image) -> np.ndarray:
    """Convert any PIL mode to uint8 RGB; 16-bit data is scaled, alpha is composited on white."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        data = np.asarray(image, dtype=np.float64)
        top = 65535.0 if data.max() > 255 else 255.0
        gray = np.clip(data / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode == "F":
        data = np.asarray(image, dtype=np.float64)
        gray = np.clip(data * (255.0 if data.max() <= 1.0 else 1.0), 0, 255).astype(np.uint8)
        return np.repeat(gray[..., None], 3, axis=2)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def save_image(path: str | Path, array: np.ndarray, *, pnginfo: dict[str, str] | None = None, quality: int = 95) -> Path:
    """Write an (H, W, 3) or (H, W) uint8 array atomically; PNG text chunks from ``pnginfo``."""
    from PIL import PngImagePlugin

    path = Path(path)
    image = Image.fromarray(np.ascontiguousarray(array))
    kwargs: dict[str, Any] = {}
    suffix = path.suffix.lower()
    if suffix == ".png" and pnginfo:
        info = PngImagePlugin.PngInfo()
        for key, value in pnginfo.items():
            info.add_text(key, value)
        kwargs["pnginfo"] = info
    elif suffix in (".jpg", ".jpeg"):
        kwargs["quality"] = quality
    fmt = {".jpg": "JPEG", ".jpeg": "JPEG", ".png": "PNG", ".webp": "WEBP", ".bmp": "BMP"}.get(suffix, "PNG")
    with atomic_path(path) as tmp:
        image.save(tmp, format=fmt, **kwargs)
    return path


def save_json(path: str | Path, data: Any) -> Path:
    path = Path(path)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, sort_keys=True, default=_json_default))
    return path


def _json_default(value: Any) -> Any:
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, (np.floating, np.integer)):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def save_tensors(path: str | Path, tensors: dict, metadata: dict[str, str] | None = None) -> Path:
    """Atomic ``safetensors.torch.save_file``."""
    from safetensors.torch import save_file

    path = Path(path)
    with atomic_path(path) as tmp:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path next to ``path``; on success it replaces ``path`` in one rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def read_tensor_file(path: str | Path, what: str = "weights") -> dict:
    """Tensors of a ``.safetensors`` file, or of a torch file read with ``weights_only=True`` (no pickled code
    runs). The shared reader for user-supplied checkpoints; ``what`` names the model in errors."""
    import torch

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{what} not found: {path}")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # UnpicklingError, RuntimeError: a corrupt or code-carrying file
        raise ValueError(f"{what} {path}: not a tensor file loadable with weights_only=True ({error})") from error


def images_to_tensor(images: Any, name: str) -> torch.Tensor:
    """uint8 (H, W, 3) / (B, H, W, 3) arrays, a list of them, paths, or a float (B, 3, H, W) tensor -> (B, 3, H, W)."""
    import torch

    if isinstance(images, torch.Tensor):
        tensor = images[None] if images.ndim == 3 else images
        if tensor.ndim != 4 or tensor.shape[1] != 3:
            raise ValueError(f"{name}: tensor must be (B, 3, H, W) in [0, 1], got {tuple(tensor.shape)}")
        return tensor.float()
    if isinstance(images, (str, Path)):
        images = [load_image(images)]
    elif isinstance(images, np.ndarray):
        images = [images] if images.ndim == 3 else list(images)
    arrays = [load_image(i) if isinstance(i, (str, Path)) else np.asarray(i) for i in images]
    if not arrays or any(a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 for a in arrays):
        raise ValueError(f"{name}: expected uint8 RGB images (H, W, 3)")
    if len({a.shape for a in arrays}) != 1:
        raise ValueError(f"{name}: images differ in size {sorted({a.shape for a in arrays})}")
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255.0
