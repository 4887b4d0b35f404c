"""Build the metric extractors from whatever weights are present, falling back to embedded models.

Every network comes from the weights registry (``registry/eval.toml``; glintr100 from the ``antelopev2`` pack)
or an explicit path. A missing file never stops an evaluation: the metric switches to its embedded fallback and
the report says so (``fallback: true`` and a label naming the model actually used).
"""

from __future__ import annotations

import dataclasses
import logging

import numpy as np
import torch

from appleswap.eval import dlib_id, fid, glint
from appleswap.eval.features import Extractor, id_mask, mesh_or_none, nan_features, points5_or_none
from appleswap.eval.gaze import VERSION as GAZE_VERSION
from appleswap.eval.gaze import gaze_vector
from appleswap.face_metrics import arcface, expression, pose
from appleswap.identity.align import arcface_crop
from appleswap.weights import MissingWeightError, locate

log = logging.getLogger(__name__)


@dataclasses.dataclass
class WeightPaths:
    """Explicit weight files (None: look them up in the registry under ``weights_dir``)."""

    weights_dir: str | None = None
    irse50: str | None = None
    glint: str | None = None
    hopenet: str | None = None
    deep3d: str | None = None
    inception: str | None = None


def _find(name: str, paths: WeightPaths, explicit: str | None, inside: str | None = None,
          instead: str = "using the embedded fallback"):
    try:
        found = locate(name, paths.weights_dir, explicit=None if inside else explicit)
    except MissingWeightError as error:
        if explicit and inside:
            return explicit
        log.warning("%s -> %s", str(error).splitlines()[0], instead)
        return None
    if inside:
        return explicit or (found / inside)
    return found


def identity_extractors(paths: WeightPaths, device: str, id_mask_from: str) -> list[Extractor]:
    """IR-SE50 (protocol), glintr100 (independent) and dlib (embedded fallback when both are missing)."""
    extractors = []
    irse_path = _find("arcface_irse50", paths, paths.irse50)
    if irse_path is not None:
        model = arcface.load_irse50(irse_path, device)

        def irse(images, own, masks):
            batch = torch.stack([arcface.reface_input(im, id_mask(m) if m else None) for im, m in zip(images, masks)])
            return [{"embedding": e} for e in arcface.embed_prepared(model, batch).numpy()]

        extractors.append(Extractor("arcface_irse50", f"{arcface.VERSION}-mask-{id_mask_from}",
                                    "ArcFace IR-SE50 (pSp), parser-masked (FFHQ protocol)", irse, uses_mask=True))
    glint_path = _find("antelopev2", paths, paths.glint, inside="glintr100.onnx")
    if glint_path is not None:
        recogniser = glint.GlintRecognizer(glint_path, device)

        def glint_compute(images, own, masks):
            out = []
            for image, face in zip(images, own):
                points = points5_or_none(face)
                if points is None:
                    out.append(nan_features(embedding=(512,)))
                else:
                    out.append({"embedding": recogniser.embed([arcface_crop(image, points, recogniser.size)])[0]})
            return out

        extractors.append(Extractor("glintr100", glint.VERSION, "antelopev2 glintr100 (not used in training)",
                                    glint_compute))
    if not extractors and dlib_id.available():
        recogniser_dlib = dlib_id.DlibRecognizer()

        def dlib_compute(images, own, masks):
            out = []
            for image, face in zip(images, own):
                mesh = mesh_or_none(face)
                out.append(nan_features(embedding=(128,)) if mesh is None else
                           {"embedding": recogniser_dlib.embed(image, dlib_id.mesh_box(mesh))})
            return out

        extractors.append(Extractor("dlib", dlib_id.VERSION, "dlib ResNet descriptor (embedded fallback)",
                                    dlib_compute, fallback=True))
    return extractors


def pose_extractor(paths: WeightPaths, device: str) -> Extractor:
    hopenet_path = _find("hopenet_robust", paths, paths.hopenet)
    if hopenet_path is not None:
        model = pose.load_hopenet(hopenet_path, device)
        return Extractor("hopenet", pose.HOPENET_VERSION, "HopeNet robust alpha=1 (FFHQ protocol)",
                         lambda images, own, masks: [{"angles": a} for a in pose.hopenet_angles(model, images)])

    def pnp(images, own, masks):
        return [{"angles": pose.pnp_angles(mesh_or_none(f), im.shape) if mesh_or_none(f) is not None
                 else np.full(3, np.nan, np.float32)} for im, f in zip(images, own)]

    return Extractor("pose_pnp", pose.PNP_VERSION, "MediaPipe mesh + solvePnP (embedded fallback)", pnp,
                     fallback=True)


def expression_extractor(paths: WeightPaths, device: str, mode: str) -> Extractor:
    deep3d_path = _find("deep3d_recon", paths, paths.deep3d)
    if deep3d_path is not None:
        model = expression.load_reconnet(deep3d_path, device)

        def deep3d(images, own, masks):
            if mode == "aligned":
                points = [points5_or_none(f) for f in own]
                keep = [i for i, p in enumerate(points) if p is not None]
                out = [{"coefficients": np.full(64, np.nan, np.float32)} for _ in images]
                if keep:
                    batch = expression.reconnet_input([images[i] for i in keep], "aligned", [points[i] for i in keep])
                    for i, c in zip(keep, expression.expression_coefficients(model, batch)):
                        out[i] = {"coefficients": c}
                return out
            batch = expression.reconnet_input(images, "reface")
            return [{"coefficients": c} for c in expression.expression_coefficients(model, batch)]

        return Extractor("deep3d", f"{expression.D3D_VERSION}-{mode}",
                         f"Deep3DFaceRecon 64-d expression ({mode} input)", deep3d)

    def mesh_expr(images, own, masks):
        return [{"coefficients": expression.mesh_expression(mesh_or_none(f)) if mesh_or_none(f) is not None
                 else np.full(7, np.nan, np.float32)} for f in own]

    return Extractor("mesh_expression", expression.MESH_VERSION, "mesh expression ratios (embedded fallback)",
                     mesh_expr, fallback=True)


def gaze_extractor() -> Extractor:
    return Extractor("gaze", GAZE_VERSION, "MediaPipe iris gaze (eye-in-head)",
                     lambda images, own, masks: [{"vector": gaze_vector(mesh_or_none(f))} for f in own])


def inception_extractor(paths: WeightPaths, device: str) -> Extractor | None:
    inception_path = _find("fid_inception", paths, paths.inception, instead="FID/KID not computed")
    if inception_path is None:
        return None
    model = fid.load_fid_inception(inception_path, device)
    return Extractor("inception", fid.VERSION, "pytorch-fid InceptionV3 pool3",
                     lambda images, own, masks: [{"pool3": f} for f in fid.inception_features(model, images)])


def parser_from_registry(paths: WeightPaths) -> str | None:
    """The BiSeNet parser file when present in the weights folder (the faces stage's entries)."""
    for name in ("face_parser", "facexlib_parsing"):
        try:
            return str(locate(name, paths.weights_dir))
        except (MissingWeightError, KeyError):
            continue
    log.warning("no face-parser weights: identity/skin masks come from the MediaPipe mesh (fallback)")
    return None
