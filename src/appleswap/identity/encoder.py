"""PuLID identity encoder: photos -> (N, 32, 2048) ID tokens, as PuLID-FLUX v0.9.1 ``get_id_embedding`` does.

Per photo: shrink to a 1024 long side; SCRFD finds the largest face; glintr100 embeds its 112 ArcFace crop (raw,
512-d); the face is aligned to a 512 crop, parsed, and turned into PuLID's grey-face-on-white picture; EVA02-CLIP
gives the L2-normalised CLS (768) and the 5 hidden states; the IDFormer maps [ArcFace ; CLS] and the hiddens to
the tokens. Differences from PuLID: alignment uses SCRFD's 5 points instead of a second (RetinaFace) detector,
and without a BiSeNet checkpoint the parsing comes from the MediaPipe mesh (recorded as ``mask_source``).

Several photos of one person (``encode_identity``) are averaged in the encoder's INPUT space (raw ArcFace
vectors, CLS re-normalised, hidden states) and run through the IDFormer once: the result is still an IDFormer
output, i.e. on the distribution the ID cross-attention was trained on, whereas averaging output tokens shrinks
them wherever photos disagree. All aligned crops share one template, so their hidden states are aligned too.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

from appleswap.identity.align import arcface_crop, face_crop_512
from appleswap.identity.arcface import ArcFaceONNX
from appleswap.identity.eva_clip import EvaClipVision
from appleswap.identity.idformer import IDFormer
from appleswap.identity.masking import FaceRegion, apply_mask, crop_mask_to_image, face_classes_mask, gray_face_image
from appleswap.identity.scrfd import SCRFDDetector

log = logging.getLogger(__name__)

MAX_LONG_SIDE = 1024
CROP_SIZE = 512


@dataclass
class IdFeatures:
    """The IDFormer inputs for N photos: id_cond (N, 512 + 768) and 5 hidden states (N, 577, 1024)."""

    id_cond: torch.Tensor
    hidden: list[torch.Tensor]
    mask_sources: list[str] = field(default_factory=list)

    def mean(self, arcface_dim: int) -> IdFeatures:
        """One averaged identity: raw ArcFace mean, CLS mean re-normalised to unit length, hidden-state mean."""
        arc = self.id_cond[:, :arcface_dim].mean(0, keepdim=True)
        cls = torch.nn.functional.normalize(self.id_cond[:, arcface_dim:].mean(0, keepdim=True), dim=-1)
        hidden = [h.mean(0, keepdim=True) for h in self.hidden]
        return IdFeatures(torch.cat([arc, cls], dim=-1), hidden, sorted(set(self.mask_sources)))


def shrink_long_side(image: np.ndarray, limit: int = MAX_LONG_SIDE) -> np.ndarray:
    """PuLID's ``resize_numpy_image_long``: Lanczos-shrink images whose long side exceeds ``limit``."""
    height, width = image.shape[:2]
    if max(height, width) <= limit:
        return image
    k = limit / max(height, width)
    return cv2.resize(image, (int(width * k), int(height * k)), interpolation=cv2.INTER_LANCZOS4)


def _check_image(image: np.ndarray, name: str) -> None:
    if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"{name}: expected an RGB uint8 (H, W, 3) array, got "
                         f"{type(image).__name__} {getattr(image, 'shape', '')} {getattr(image, 'dtype', '')}")


def _file_tag(path: Path) -> str:
    return f"{path.name} ({path.stat().st_size} bytes)" if path.is_file() else path.name


class IdentityEncoder:
    """antelopev2 + EVA02-CLIP + IDFormer; see the module docstring for the exact pipeline."""

    def __init__(self, detector: SCRFDDetector, arcface: ArcFaceONNX, eva: EvaClipVision, idformer: IDFormer,
                 region: FaceRegion, *, device: str = "cpu", dtype: torch.dtype = torch.float32,
                 versions: dict[str, str] | None = None) -> None:
        self.detector, self.arcface, self.eva, self.idformer, self.region = detector, arcface, eva, idformer, region
        self.device, self.dtype = torch.device(device), dtype
        self.versions = dict(versions or {})
        self.arcface_dim = idformer.config.id_dim - eva.config.embed_dim
        if eva.config.width != idformer.config.vit_dim or self.arcface_dim <= 0:
            raise ValueError(f"IDFormer expects ViT width {idformer.config.vit_dim} and id_cond "
                             f"{idformer.config.id_dim}, but EVA-CLIP gives width {eva.config.width} and CLS "
                             f"{eva.config.embed_dim}: the PuLID and EVA-CLIP files do not belong together")
        self._null: torch.Tensor | None = None

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path | None = None, *, device: str | None = None,
                        dtype: torch.dtype = torch.float32, parser_path: str | Path | None = None,
                        det_size: int = 640) -> IdentityEncoder:
        """Load every part through the weights registry (``MissingWeightError`` says what to fetch and where).

        ``parser_path`` (a BiSeNet ``parsing_bisenet.pth`` / ``FaceParser.pth``) wins over the registry's
        ``facexlib_parsing``; without either the MediaPipe mesh supplies the face classes.
        """
        from appleswap.devices import pick_device
        from appleswap.weights import MissingWeightError, locate

        device = pick_device(device)
        antelope = locate("antelopev2", weights_dir)
        eva_path, pulid_path = locate("eva02_clip_l_336", weights_dir), locate("pulid_flux", weights_dir)
        if parser_path is None:
            try:
                parser_path = locate("facexlib_parsing", weights_dir)
            except MissingWeightError:
                log.warning("no face-parsing checkpoint (facexlib_parsing): using the MediaPipe mesh for PuLID's "
                            "grey-face step")
        providers = _onnx_providers(device)
        detector = SCRFDDetector(antelope / "scrfd_10g_bnkps.onnx", providers=providers, input_size=det_size)
        arcface = ArcFaceONNX(antelope / "glintr100.onnx", providers=providers)
        eva = EvaClipVision.from_file(eva_path, device=device, dtype=dtype)
        idformer = IDFormer.from_file(pulid_path, device=device, dtype=dtype)
        versions = {"detector": "antelopev2/" + _file_tag(antelope / "scrfd_10g_bnkps.onnx"),
                    "arcface": "antelopev2/" + _file_tag(antelope / "glintr100.onnx"),
                    "eva_clip": _file_tag(eva_path), "pulid": _file_tag(pulid_path),
                    "parser": _file_tag(Path(parser_path)) if parser_path else "none"}
        region = FaceRegion(parser_path, device=device)
        return cls(detector, arcface, eva, idformer, region, device=device, dtype=dtype, versions=versions)

    # ---- detection and per-photo preparation
    def detect(self, image: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, float]]:
        """Faces as (box (4,), kps (5, 2), score), largest box first (the face PuLID uses)."""
        _check_image(image, "image")
        faces = sorted(self.detector.detect(image), key=lambda f: f.area(), reverse=True)
        return [(f.box, f.kps, f.score) for f in faces]

    def _largest_kps(self, image: np.ndarray, name: str) -> np.ndarray:
        faces = self.detect(image)
        if not faces:
            raise ValueError(f"{name}: no face found (SCRFD score >= {self.detector.score_threshold})")
        return faces[0][1]

    def face_mask(self, image: np.ndarray, name: str = "image") -> tuple[np.ndarray, str]:
        """(H, W) bool face region of the largest face (parsing of its aligned crop, warped back) and its source."""
        crop, matrix = face_crop_512(image, self._largest_kps(image, name), CROP_SIZE)
        classes, source = self.region.classes(crop)
        return crop_mask_to_image(face_classes_mask(classes), matrix, image.shape), source

    def _prepare(self, image: np.ndarray, name: str) -> tuple[np.ndarray, np.ndarray, str]:
        """One photo -> (raw ArcFace vector, grey-face CLIP picture (512, 512, 3) float, mask source)."""
        kps = self._largest_kps(image, name)
        embedding = self.arcface.embed(arcface_crop(image, kps, self.arcface.input_size))[0]
        crop, _ = face_crop_512(image, kps, CROP_SIZE)
        classes, source = self.region.classes(crop)
        return embedding, gray_face_image(crop, classes), source

    def _inputs(self, images: Sequence[np.ndarray], masked: bool, masks: Sequence[np.ndarray] | None,
                names: Sequence[str] | None) -> tuple[list[np.ndarray], list[str]]:
        if len(images) == 0:
            raise ValueError("images: need at least one photo")
        names = list(names) if names is not None else [f"image #{i}" for i in range(len(images))]
        if len(names) != len(images) or (masks is not None and len(masks) != len(images)):
            raise ValueError("names / masks must have one entry per image")
        out = []
        for index, (image, name) in enumerate(zip(images, names)):
            _check_image(image, name)
            if masks is not None:
                image = apply_mask(image, masks[index])
            elif masked:
                image = apply_mask(image, self.face_mask(image, name)[0])
            out.append(shrink_long_side(image))
        return out, names

    @torch.no_grad()  # not inference_mode: callers may feed the tokens to modules that train
    def features(self, images: Sequence[np.ndarray], masked: bool = False, *,
                 masks: Sequence[np.ndarray] | None = None, names: Sequence[str] | None = None) -> IdFeatures:
        """The IDFormer inputs for each photo. ``masks`` (uint8 0..255 or bool, per image) override ``masked``."""
        images, names = self._inputs(images, masked, masks, names)
        prepared = [self._prepare(image, name) for image, name in zip(images, names)]
        arc = torch.from_numpy(np.stack([p[0] for p in prepared])).to(self.device, self.dtype)
        pictures = torch.from_numpy(np.stack([p[1] for p in prepared])).permute(0, 3, 1, 2).to(self.device)
        cls, hidden = self.eva(pictures)
        id_cond = torch.cat([arc, cls.to(self.dtype)], dim=-1)
        return IdFeatures(id_cond, [h.to(self.dtype) for h in hidden], [p[2] for p in prepared])

    # ---- tokens
    @torch.no_grad()  # not inference_mode: callers may feed the tokens to modules that train
    def tokens_from_features(self, features: IdFeatures) -> torch.Tensor:
        return self.idformer(features.id_cond, features.hidden)

    def encode(self, images: Sequence[np.ndarray], masked: bool = False, *,
               masks: Sequence[np.ndarray] | None = None, names: Sequence[str] | None = None) -> torch.Tensor:
        """(N, 32, 2048) ID tokens, one per photo; ValueError naming the photo when it has no face."""
        return self.tokens_from_features(self.features(images, masked, masks=masks, names=names))

    def encode_identity(self, images: Sequence[np.ndarray], masked: bool = False, *,
                        masks: Sequence[np.ndarray] | None = None,
                        names: Sequence[str] | None = None) -> torch.Tensor:
        """(1, 32, 2048): several photos of one person averaged in input space (see the module docstring)."""
        feats = self.features(images, masked, masks=masks, names=names)
        return self.tokens_from_features(feats.mean(self.arcface_dim))

    def null_tokens(self) -> torch.Tensor:
        """(1, 32, 2048) PuLID uncond: the IDFormer on all-zero inputs (constant for given weights)."""
        if self._null is None:
            grid = self.eva.config.image_size // self.eva.config.patch_size
            self._null = self.idformer.null_tokens(grid * grid + 1)
        return self._null

    def arcface_embedding(self, images: Sequence[np.ndarray], *, normalize: bool = True,
                          names: Sequence[str] | None = None) -> np.ndarray:
        """(N, 512) glintr100 embeddings of each photo's largest face (L2-normalised unless ``normalize=False``)."""
        images, names = self._inputs(images, False, None, names)
        rows = [self.arcface.embed(arcface_crop(im, self._largest_kps(im, n), self.arcface.input_size))[0]
                for im, n in zip(images, names)]
        emb = np.stack(rows).astype(np.float32)
        return emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12) if normalize else emb

    def metadata(self, *, masked: bool, mask_source: str) -> dict[str, str]:
        """What made a token file: model files, masking, and which face-class source drew the grey face."""
        return {**{f"model.{k}": v for k, v in self.versions.items()},
                "masked": str(bool(masked)).lower(), "mask_source": mask_source}


def _onnx_providers(device: str) -> list[str]:
    import onnxruntime

    if str(device).startswith("cuda") and "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]
