"""The ``3ddfa-v3`` landmark provider: 3DDFA-V3's 68 3DMM landmarks without its renderer, plus the coefficients.

Path per image (as the reference ``demo_from_folder_jiwon*.py`` with ``--detector retinaface --ldm68 1``):
RetinaFace box (first = best detection) -> two-pass 106-point net -> 5 points (74, 83, 54, 84, 90) -> scale and
translation alignment to the 224 crop -> ResNet-50 regressor -> 257 coefficients -> 3DMM landmark vertices ->
perspective projection -> y flip -> ``back_resize_ldms`` to image pixels. Images are batched through every network;
the cheap per-image crops stay on the CPU. Unlike the reference, the fitted coefficients are kept
(:class:`Tddfa3Fit`, :func:`save_fit`) so shape can be mixed with another face's expression and pose
(:func:`landmarks_from_coeffs`) and eval can compare faces in 3DMM terms.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from appleswap.faces.points import FaceLandmarks
from appleswap.faces.tddfa.align import FIVE_FROM_106, align_face, crop_to_image, load_lm3d
from appleswap.faces.tddfa.bfm import Bfm68, split_coefficients
from appleswap.faces.tddfa.landmark106 import Landmark106, LargeBaseLmksNet
from appleswap.faces.tddfa.recon import ReconNet
from appleswap.faces.tddfa.retinaface import RetinaFaceDetector

log = logging.getLogger(__name__)

WEIGHT_NAMES = {
    "face_model": "tddfa_face_model",
    "net_recon": "tddfa_net_recon",
    "landmark106": "tddfa_landmark106",
    "retinaface": "tddfa_retinaface",
    "lm3d": "tddfa_lm3d",
}
COEFF_KEYS = ("id", "exp", "angle", "trans", "alb", "sh")
FIT_FORMAT = "appleswap.tddfa3.fit/1"


@dataclasses.dataclass
class Tddfa3Fit:
    """One fitted face. Points are float32 (x, y) pixels of the input image unless named ``_crop``."""

    coeffs: dict[str, torch.Tensor]  # id (80), exp (64), angle (3, radians), trans (3), alb (80), sh (27)
    lm68: np.ndarray  # (68, 2) image pixels, iBUG-68 order
    lm68_crop: np.ndarray  # (68, 2) pixels of the 224 aligned crop, y down
    lm106: np.ndarray  # (106, 2) 2D landmark-net points, image pixels
    box: np.ndarray  # (4,) int64 RetinaFace box x1, y1, x2, y2
    trans_params: np.ndarray  # (5,) float64 (w0, h0, s, tx, ty): the crop <-> image mapping

    def to_tensors(self) -> dict[str, torch.Tensor]:
        tensors = {f"coeff.{k}": v.detach().float().cpu().reshape(-1) for k, v in self.coeffs.items()}
        tensors.update(lm68=torch.from_numpy(np.asarray(self.lm68, np.float32)),
                       lm68_crop=torch.from_numpy(np.asarray(self.lm68_crop, np.float32)),
                       lm106=torch.from_numpy(np.asarray(self.lm106, np.float32)),
                       box=torch.from_numpy(np.asarray(self.box, np.int64)),
                       trans_params=torch.from_numpy(np.asarray(self.trans_params, np.float64)))
        return tensors

    def to_record(self, digits: int = 6) -> dict[str, list]:
        """JSON-ready coefficients and crop mapping, for a manifest entry."""
        record = {k: np.round(self.coeffs[k].detach().cpu().double().numpy(), digits).tolist()
                  for k in ("id", "exp", "angle", "trans")}
        record["trans_params"] = np.round(np.asarray(self.trans_params, np.float64), digits).tolist()
        record["box"] = np.asarray(self.box, np.int64).tolist()
        return record

    @classmethod
    def from_tensors(cls, tensors: dict[str, torch.Tensor]) -> Tddfa3Fit:
        coeffs = {k.split(".", 1)[1]: v for k, v in tensors.items() if k.startswith("coeff.")}
        missing = [k for k in ("id", "exp", "angle", "trans") if k not in coeffs]
        missing += [k for k in ("lm68", "lm68_crop", "lm106", "box", "trans_params") if k not in tensors]
        if missing:
            raise ValueError(f"not a 3DDFA-V3 fit: missing {missing}")
        return cls(coeffs=coeffs, lm68=tensors["lm68"].numpy(), lm68_crop=tensors["lm68_crop"].numpy(),
                   lm106=tensors["lm106"].numpy(), box=tensors["box"].numpy(),
                   trans_params=tensors["trans_params"].numpy())


def save_fit(path: str | Path, fit: Tddfa3Fit) -> Path:
    """Write a fit as safetensors (atomic), keys ``coeff.id`` ... ``lm68``, ``trans_params``."""
    from appleswap.files import save_tensors

    return save_tensors(path, fit.to_tensors(), metadata={"format": FIT_FORMAT})


def load_fit(path: str | Path) -> Tddfa3Fit:
    from safetensors import safe_open

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"3DDFA-V3 fit file not found: {path}")
    with safe_open(str(path), framework="pt") as handle:
        if (handle.metadata() or {}).get("format") != FIT_FORMAT:
            raise ValueError(f"{path}: not a 3DDFA-V3 fit file (format metadata != {FIT_FORMAT!r})")
        return Tddfa3Fit.from_tensors({k: handle.get_tensor(k) for k in handle.keys()})  # noqa: SIM118


def landmarks_from_coeffs(bfm: Bfm68, coeffs: dict[str, torch.Tensor], trans_params: np.ndarray) -> np.ndarray:
    """(68, 2) image pixels for one face's coefficients, e.g. a source's ``id`` with a target's ``exp``,
    ``angle`` and ``trans``, drawn in the target's frame (its ``trans_params``)."""
    batch = {k: torch.as_tensor(coeffs[k]).reshape(1, -1).to(bfm.u.device) for k in ("id", "exp", "angle", "trans")}
    with torch.inference_mode():
        crop = bfm.landmarks(batch)[0].cpu().numpy().astype(np.float32)
    return crop_to_image(crop, trans_params).astype(np.float32)


def coefficient_distances(a: Tddfa3Fit, b: Tddfa3Fit) -> dict[str, float]:
    """3DMM distances between two fits: L2 of identity / expression coefficients, pose angle (degrees, the
    largest of yaw, pitch, roll differences) and translation L2."""
    def diff(key: str) -> np.ndarray:
        return (a.coeffs[key].detach().cpu().double() - b.coeffs[key].detach().cpu().double()).numpy()

    return {"id_l2": float(np.linalg.norm(diff("id"))), "exp_l2": float(np.linalg.norm(diff("exp"))),
            "pose_deg": float(np.degrees(np.abs(diff("angle")).max())), "trans_l2": float(np.linalg.norm(diff("trans")))}


def resolve_device(device: str | torch.device | None) -> torch.device:
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Tddfa3Landmarker:
    """3DDFA-V3 68-point 3DMM landmarks; ``fit_batch`` runs many images through each network at once."""

    name = "3ddfa-v3"

    def __init__(self, detector: RetinaFaceDetector, landmark106: Landmark106, recon: ReconNet, bfm: Bfm68,
                 lm3d: np.ndarray, device: str | torch.device = "cpu", batch_size: int = 16) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.device = torch.device(device)
        self.detector, self.landmark106 = detector, landmark106
        self.recon, self.bfm = recon.to(self.device).eval(), bfm.to(self.device)
        self.lm3d, self.batch_size = lm3d, batch_size
        self.last_fit: Tddfa3Fit | None = None  # the fit behind the latest __call__, for callers that save it

    @classmethod
    def from_weights(cls, weights_dir: str | Path | None = None, device: str | torch.device | None = None,
                     batch_size: int = 16) -> Tddfa3Landmarker:
        """Load the five 3DDFA-V3 assets through the weights registry (``MissingWeightError`` names any absent)."""
        from appleswap.weights import locate

        paths = {key: locate(name, weights_dir) for key, name in WEIGHT_NAMES.items()}
        dev = resolve_device(device)
        log.info("loading 3DDFA-V3 from %s on %s", paths["net_recon"].parent, dev)
        return cls(
            detector=RetinaFaceDetector.from_file(paths["retinaface"], dev),
            landmark106=Landmark106(LargeBaseLmksNet.from_file(paths["landmark106"]), dev),
            recon=ReconNet.from_file(paths["net_recon"]), bfm=Bfm68.from_file(paths["face_model"]),
            lm3d=load_lm3d(paths["lm3d"]), device=dev, batch_size=batch_size,
        )

    def fit(self, image: np.ndarray) -> Tddfa3Fit | None:
        """Fit one RGB uint8 image; None when RetinaFace finds no face (the reference skips such images)."""
        return self.fit_batch([image])[0]

    def fit_batch(self, images: list[np.ndarray]) -> list[Tddfa3Fit | None]:
        """Fit RGB uint8 images in chunks of ``batch_size``; one entry per image, None where no face was found."""
        results: list[Tddfa3Fit | None] = []
        for start in range(0, len(images), self.batch_size):
            results += self._fit_chunk([_check_image(im) for im in images[start:start + self.batch_size]])
        return results

    def __call__(self, image: np.ndarray, key: str | None = None):
        """``FaceLandmarks`` (lm68 only) for the preprocess runner; ValueError when no face is found."""
        fit = self.last_fit = self.fit(image)
        if fit is None:
            raise ValueError(f"no face found by 3DDFA-V3 RetinaFace{f' in {key}' if key else ''}")
        return FaceLandmarks(lm68=fit.lm68.copy(), iris=None, mesh=None, segmap=None)

    def _fit_chunk(self, images: list[np.ndarray]) -> list[Tddfa3Fit | None]:
        boxes = self.detector.detect_batch(images)
        found = [i for i, b in enumerate(boxes) if len(b)]
        lm106 = dict(zip(found, self.landmark106([images[i] for i in found], [boxes[i][0] for i in found])))
        crops, params = {}, {}
        for i in found:
            five = lm106[i][list(FIVE_FROM_106)].astype(np.float32)
            try:
                crops[i], params[i] = align_face(images[i], five, self.lm3d)
            except ValueError as error:
                log.warning("image %d of the batch: %s; skipped", i, error)
        if not crops:
            return [None] * len(images)
        order = sorted(crops)
        batch = torch.from_numpy(np.stack([crops[i] for i in order]).astype(np.float32) / 255.0)
        with torch.inference_mode():
            alpha = self.recon(batch.permute(0, 3, 1, 2).contiguous().to(self.device)).float()
            coeffs = split_coefficients(alpha)
            lm_crop = self.bfm.landmarks(coeffs).cpu().numpy()
        out: list[Tddfa3Fit | None] = [None] * len(images)
        for row, i in enumerate(order):
            out[i] = Tddfa3Fit(
                coeffs={k: coeffs[k][row].detach().cpu().clone() for k in COEFF_KEYS},
                lm68=crop_to_image(lm_crop[row], params[i]).astype(np.float32),
                lm68_crop=lm_crop[row].astype(np.float32), lm106=lm106[i].astype(np.float32),
                box=np.asarray(boxes[i][0], np.int64), trans_params=params[i])
        return out


def _check_image(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"image must be an RGB uint8 array (H, W, 3), got {image.dtype} {image.shape}")
    return np.ascontiguousarray(image)
