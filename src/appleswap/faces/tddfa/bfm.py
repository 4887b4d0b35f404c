"""The 3DDFA-V3 face model (``face_model.npy``) read safely, and the 3DMM -> 68 landmark projection.

``face_model.npy`` is a NumPy *object* array holding a pickled dict, which NumPy's pickle-enabled loading would
unpickle with the full pickle machinery (arbitrary code). :func:`load_face_model` instead parses the ``.npy``
header itself and unpickles the payload with :class:`_ArrayOnlyUnpickler`, which resolves only the handful of
NumPy globals needed to rebuild arrays and dtypes (``_reconstruct``, ``ndarray``, ``dtype``, ``scalar``,
``_frombuffer``); any other global (``os.system``, ``builtins.eval``, ...) raises ``UnpicklingError``. Dicts, lists,
tuples, strings and numbers are built by pickle opcodes and need no globals. A plain (non-object) array file is
read with ``allow_pickle=False``.

Geometry (as ``model/recon.py``): shape = u + id @ alpha_id + exp @ alpha_exp, rotation R = (Rz Ry Rx)^T applied as
``v @ R + t``, camera at z = 10 looking down -z (z' = 10 - z), pinhole focal 1015 and centre 112 in the 224 crop,
then y' = 223 - y. Only the 68 landmark vertices are evaluated: the same per-vertex arithmetic, 500x less work.
"""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

FOCAL = 1015.0
CENTER = 112.0
CAMERA_DISTANCE = 10.0
CROP_SIZE = 224
REQUIRED_KEYS = ("u", "id", "exp", "ldm68")
COEFF_SPLIT = {"id": (0, 80), "exp": (80, 144), "alb": (144, 224), "angle": (224, 227), "sh": (227, 254),
               "trans": (254, 257)}

_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar"),
    ("numpy.core.numeric", "_frombuffer"), ("numpy._core.numeric", "_frombuffer"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can only rebuild NumPy arrays, dtypes and scalars (see module doc)."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"refused to load global {module}.{name} (only NumPy arrays are allowed)")
        if name in ("ndarray", "dtype"):
            return getattr(np, name)
        from numpy._core import multiarray, numeric

        return getattr(numeric if name == "_frombuffer" else multiarray, name)


def safe_load_npy(path: str | Path) -> Any:
    """An ``.npy`` file's content; object arrays are unpickled with :class:`_ArrayOnlyUnpickler` only."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"face model not found: {path}")
    with open(path, "rb") as handle:
        try:
            version = np.lib.format.read_magic(handle)
            reader = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
            _, _, dtype = reader(handle)
        except ValueError as error:
            raise ValueError(f"{path}: not a .npy file ({error})") from error
        if not dtype.hasobject:
            handle.seek(0)
            return np.load(handle, allow_pickle=False)
        try:
            array = _ArrayOnlyUnpickler(handle, encoding="latin1").load()
        except (pickle.UnpicklingError, EOFError, AttributeError, TypeError) as error:
            raise ValueError(f"{path}: refused or unreadable pickled content ({error})") from error
    if isinstance(array, np.ndarray) and array.dtype.hasobject and array.shape == ():
        return array.item()
    return array


def load_face_model(path: str | Path) -> dict[str, np.ndarray]:
    """``u``, ``id``, ``exp`` and ``ldm68`` from ``face_model.npy`` (a dict) or a converted ``.npz``."""
    path = Path(path)
    if path.suffix == ".npz":
        with np.load(path, allow_pickle=False) as data:
            model = {k: data[k] for k in data.files}
    else:
        model = safe_load_npy(path)
    if not isinstance(model, dict):
        raise ValueError(f"{path}: expected a dict of arrays, found {type(model).__name__}")  # noqa: TRY004
    missing = [k for k in REQUIRED_KEYS if k not in model]
    if missing:
        raise ValueError(f"{path}: face model lacks keys {missing} (found {sorted(model)[:12]})")
    out = {k: np.asarray(model[k]) for k in REQUIRED_KEYS}
    n = out["u"].size
    if n % 3 or out["id"].shape[0] != n or out["exp"].shape[0] != n or out["ldm68"].size != 68:
        raise ValueError(f"{path}: inconsistent shapes u {out['u'].shape}, id {out['id'].shape}, "
                         f"exp {out['exp'].shape}, ldm68 {out['ldm68'].shape}")
    return out


def convert_face_model(src: str | Path, dst: str | Path) -> Path:
    """One-time conversion of ``face_model.npy`` to a pickle-free ``.npz`` with the four arrays used here."""
    from appleswap.files import atomic_path

    model = load_face_model(src)
    dst = Path(dst)
    with atomic_path(dst) as tmp, open(tmp, "wb") as handle:
        np.savez(handle, **model)
    return dst


def split_coefficients(alpha: torch.Tensor) -> dict[str, torch.Tensor]:
    """The regressor's 257 outputs as id (80), exp (64), alb (80), angle (3), sh (27), trans (3)."""
    if alpha.shape[-1] != 257:
        raise ValueError(f"expected 257 coefficients, got {tuple(alpha.shape)}")
    return {name: alpha[..., a:b] for name, (a, b) in COEFF_SPLIT.items()}


def rotation_matrix(angles: torch.Tensor) -> torch.Tensor:
    """(B, 3, 3) matrix R with ``points @ R`` = rotate by Rz(c) Ry(b) Rx(a); angles (B, 3) in radians."""
    x, y, z = angles[:, 0], angles[:, 1], angles[:, 2]
    one, zero = torch.ones_like(x), torch.zeros_like(x)
    rot_x = torch.stack([one, zero, zero, zero, x.cos(), -x.sin(), zero, x.sin(), x.cos()], 1).view(-1, 3, 3)
    rot_y = torch.stack([y.cos(), zero, y.sin(), zero, one, zero, -y.sin(), zero, y.cos()], 1).view(-1, 3, 3)
    rot_z = torch.stack([z.cos(), -z.sin(), zero, z.sin(), z.cos(), zero, zero, zero, one], 1).view(-1, 3, 3)
    return (rot_z @ rot_y @ rot_x).permute(0, 2, 1)


def project(vertices: torch.Tensor, angles: torch.Tensor, trans: torch.Tensor) -> torch.Tensor:
    """Model-space vertices (B, N, 3) -> 224-crop pixels (B, N, 2), y pointing down (reference y flip applied)."""
    posed = vertices @ rotation_matrix(angles) + trans.unsqueeze(1)
    depth = CAMERA_DISTANCE - posed[..., 2]
    u = FOCAL * posed[..., 0] / depth + CENTER
    v = FOCAL * posed[..., 1] / depth + CENTER
    return torch.stack([u, (CROP_SIZE - 1) - v], dim=-1)


class Bfm68(torch.nn.Module):
    """The 68 landmark vertices of the 3DMM: ``vertices(id, exp)`` and ``landmarks(coeffs)`` in crop pixels."""

    def __init__(self, u: np.ndarray, id_basis: np.ndarray, exp_basis: np.ndarray, ldm68: np.ndarray) -> None:
        super().__init__()
        rows = (np.asarray(ldm68, dtype=np.int64).reshape(68, 1) * 3 + np.arange(3)).reshape(-1)
        if rows.min() < 0 or rows.max() >= np.asarray(u).size:
            raise ValueError("ldm68 indices fall outside the mesh")
        self.register_buffer("u", torch.tensor(np.asarray(u).reshape(-1)[rows], dtype=torch.float32))
        self.register_buffer("id_basis", torch.tensor(np.asarray(id_basis)[rows], dtype=torch.float32))
        self.register_buffer("exp_basis", torch.tensor(np.asarray(exp_basis)[rows], dtype=torch.float32))

    @classmethod
    def from_file(cls, path: str | Path) -> Bfm68:
        model = load_face_model(path)
        return cls(model["u"], model["id"], model["exp"], model["ldm68"])

    @property
    def n_id(self) -> int:
        return int(self.id_basis.shape[1])

    @property
    def n_exp(self) -> int:
        return int(self.exp_basis.shape[1])

    def vertices(self, alpha_id: torch.Tensor, alpha_exp: torch.Tensor) -> torch.Tensor:
        """(B, 68, 3) model-space landmark vertices for identity (B, 80) and expression (B, 64) coefficients."""
        shape = torch.einsum("ij,aj->ai", self.id_basis, alpha_id) + torch.einsum("ij,aj->ai", self.exp_basis,
                                                                                   alpha_exp)
        return (shape + self.u.reshape(1, -1)).reshape(alpha_id.shape[0], 68, 3)

    def landmarks(self, coeffs: dict[str, torch.Tensor]) -> torch.Tensor:
        """(B, 68, 2) crop pixels (y down) from a coefficient dict with id, exp, angle, trans."""
        verts = self.vertices(coeffs["id"].float(), coeffs["exp"].float())
        return project(verts, coeffs["angle"].float(), coeffs["trans"].float())
