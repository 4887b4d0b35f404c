"""Robust file I/O shared by every stage: image decoding with clear errors, atomic writes, and the error model.

Every writer goes through a temporary file in the same folder, flushed to disk with ``fsync``, then ``os.replace``d
onto the final name, so a killed job or a full disk never leaves a half-written output behind (resumable stages
rely on "file exists" meaning "file is complete"). Outputs get the usual ``0666 & ~umask`` mode.

Two kinds of failure, handled differently by every command:
- a bad input (:class:`ImageLoadError`, other ``ValueError``): recorded per item, the batch goes on, not retried;
- a fault of the environment (:func:`environment_fault`: disk full, no permission, read-only file system, a missing
  device): the command stops with one line naming the path and the cause, nothing is recorded against the item,
  so running the same command again (with space, permission, the device) retries it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import sys
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


# errno values that mean "the machine, not the input": retried on the next run, never recorded against an item
ENVIRONMENT_ERRNOS = {
    errno.ENOSPC: "no space left on the device (disk full)",
    errno.EDQUOT: "disk quota exceeded",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
    errno.EIO: "input/output error (failing disk or lost network mount)",
    errno.ENODEV: "no such device",
    errno.ENXIO: "no such device or address",
    errno.EMFILE: "too many open files",
    errno.ENFILE: "too many open files in the system",
    errno.ENOMEM: "out of memory",
}
DEVICE_ERROR_MARKERS = ("CUDA out of memory", "out of memory", "No CUDA GPUs are available",
                        "Torch not compiled with CUDA", "CUDA driver", "CUDA error", "no kernel image",
                        "Found no NVIDIA driver", "device-side assert", "MPS backend out of memory")


class EnvironmentFault(RuntimeError):
    """A fault of the machine (disk full, permission, read-only folder, missing device), not of the input.

    Commands stop on it with its one-line message; the item it hit is not recorded as failed, so a rerun retries it.
    ``path`` names the file or folder, ``cause`` says what went wrong in words.
    """

    def __init__(self, cause: str, path: str | Path | None = None, hint: str = "") -> None:
        self.cause, self.path, self.hint = cause, (str(path) if path is not None else None), hint
        where = f"{self.path}: " if self.path else ""
        super().__init__(f"{where}{cause}" + (f"; {hint}" if hint else ""))

    def __reduce__(self):  # crosses process boundaries (preprocess workers) with its fields
        return (type(self), (self.cause, self.path, self.hint))


def raise_if_environment(error: BaseException, path: str | Path | None = None) -> None:
    """Re-raise ``error`` as its :class:`EnvironmentFault` when it is one; per-item error handlers call this first
    so a full disk or a permission problem stops the run instead of being recorded against the item."""
    fault = environment_fault(error, path)
    if fault is not None:
        raise fault from error


def environment_fault(error: BaseException, path: str | Path | None = None) -> EnvironmentFault | None:
    """The :class:`EnvironmentFault` that ``error`` stands for, or None when it is not one (a bad input, a bug).

    Looks through ``__cause__``/``__context__`` so a wrapped ``OSError`` is still recognised; ``path`` is used when
    the error does not name its own file.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, EnvironmentFault):
            return current
        if isinstance(current, ValueError):  # classified as a bad input (e.g. ImageLoadError of an unreadable file)
            return None
        if isinstance(current, OSError) and current.errno in ENVIRONMENT_ERRNOS:
            where = current.filename if current.filename is not None else path
            return EnvironmentFault(ENVIRONMENT_ERRNOS[current.errno], where, _hint(current.errno))
        if isinstance(current, (RuntimeError, MemoryError, AssertionError)) and not isinstance(
                current, NotImplementedError):  # torch reports a missing CUDA build with an AssertionError
            text = str(current)
            if isinstance(current, MemoryError) or any(marker in text for marker in DEVICE_ERROR_MARKERS):
                first = text.strip().splitlines()[0] if text.strip() else type(current).__name__
                return EnvironmentFault(f"device or memory failure: {first}", path,
                                        "check --device, free memory or use a smaller --batch-size")
        current = current.__cause__ or current.__context__
    return None


def _hint(code: int) -> str:
    if code in (errno.ENOSPC, errno.EDQUOT):
        return "free some space and run the same command again (finished outputs are kept)"
    if code in (errno.EACCES, errno.EPERM, errno.EROFS):
        return "choose a writable folder or fix its permissions, then run the same command again"
    return "run the same command again once it is fixed"


def cache_dir(*parts: str) -> Path:
    """The folder for caches: ``$APPLESWAP_CACHE``, else ``$XDG_CACHE_HOME/appleswap`` (``~/.cache/appleswap``;
    ``%LOCALAPPDATA%`` on Windows, ``~/Library/Caches`` on macOS). Never the weights folder, which may be read-only."""
    root = os.environ.get("APPLESWAP_CACHE")
    if not root:
        if sys.platform == "win32":
            base = os.environ.get("LOCALAPPDATA") or str(Path.home() / "AppData" / "Local")
        elif sys.platform == "darwin":
            base = str(Path.home() / "Library" / "Caches")
        else:
            base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        root = str(Path(base) / "appleswap")
    return Path(root).expanduser().joinpath(*parts)


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
    return write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True, default=_json_default))


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


def current_umask() -> int:
    """The process umask, read without changing it where the OS allows (``/proc``), else by a set-and-restore."""
    try:
        with open("/proc/self/status", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def output_mode() -> int:
    """The mode of a new output file: ``0666 & ~umask`` (what ``open(..., 'w')`` would create)."""
    return 0o666 & ~current_umask()


def _fsync_file(path: Path) -> None:
    """Push a closed file's data to the disk, so a full disk is reported here and not after the rename."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); folders cannot be opened this way on Windows."""
    if os.name != "posix":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError as error:  # some file systems refuse fsync on folders; the data itself is already synced
        if error.errno not in (errno.EINVAL, errno.EBADF, errno.ENOTSUP):
            raise
    finally:
        os.close(fd)


def commit_temporary(tmp: str | Path, path: str | Path, mode: int | None = None) -> Path:
    """Give a finished temporary file the umask's mode (or ``mode``, e.g. 0o600 for a private key), fsync it and
    rename it onto ``path`` (same folder)."""
    tmp, path = Path(tmp), Path(path)
    _fsync_file(tmp)  # before the chmod: a umask of 0o777 would leave nothing to open the file with
    os.chmod(tmp, output_mode() if mode is None else mode)
    os.replace(tmp, path)
    _fsync_folder(path.parent)
    return path


@contextlib.contextmanager
def atomic_path(path: str | Path, mode: int | None = None) -> Iterator[Path]:
    """Yield a temporary path next to ``path`` for a writer to fill and close; on success the file is fsynced, given
    the umask's mode and renamed onto ``path`` in one step. On any error the temporary file is removed and ``path``
    is left as it was (absent or the previous complete version)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd, name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as error:
        raise _naming(error, path) from error
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        commit_temporary(tmp, path, mode)
    except OSError as error:  # name the output the user asked for, not our temporary file
        if error.errno is None or error.filename not in (None, str(tmp), tmp):
            raise
        raise _naming(error, path) from error
    finally:
        with contextlib.suppress(OSError):
            tmp.unlink()


def _naming(error: OSError, path: Path) -> OSError:
    """The same OSError (same errno, so the same subclass) naming ``path``."""
    if error.errno is None:
        return error
    return OSError(error.errno, error.strerror or os.strerror(error.errno), str(path))


@contextlib.contextmanager
def atomic_write(path: str | Path, mode: str = "w", encoding: str | None = "utf-8") -> Iterator[Any]:
    """``open(path, mode)`` that is atomic: the handle writes a temporary file that replaces ``path`` on success."""
    if "b" in mode:
        encoding = None
    with atomic_path(path) as tmp, open(tmp, mode, encoding=encoding) as handle:
        yield handle


def write_text_atomic(path: str | Path, text: str) -> Path:
    """``Path.write_text`` through :func:`atomic_path`."""
    with atomic_write(path) as handle:
        handle.write(text)
    return Path(path)


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
