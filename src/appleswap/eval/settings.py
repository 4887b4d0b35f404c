"""The evaluation settings as data (importable without torch, so ``appleswap eval --help`` stays fast)."""

from __future__ import annotations

import dataclasses
from typing import Literal

from appleswap.config import option


@dataclasses.dataclass(frozen=True)
class EvalConfig:
    pairs: str = option("ffhq", "pair CSV (id,source,target[,swap]) or 'ffhq' for the shipped FFHQ protocol list")
    swapped: str | None = option(None, "folder of swapped images (<id>.* or <target stem>.*)")
    sources: str | None = option(None, "folder the pair list's source names resolve against")
    targets: str | None = option(None, "folder the pair list's target names resolve against")
    reference: str | None = option(None, "reference image folder for FID/KID (FFHQ protocol: images512)")
    out: str = option("eval_report", "output folder for report.json and report.html", flag="output", short="-o")
    cache: str | None = option(None, "feature cache folder (default: <output>/cache); share it between runs")
    batch_size: int = option(16, "images per network batch")
    parser_weights: str | None = option(None, "BiSeNet face-parser weights for masks (default: MediaPipe mesh)")
    irse50: str | None = option(None, "model_ir_se50.pth (default: registry 'arcface_irse50')")
    glint: str | None = option(None, "glintr100.onnx (default: registry 'antelopev2')")
    hopenet: str | None = option(None, "hopenet_robust_alpha1.pkl (default: registry 'hopenet_robust')")
    deep3d: str | None = option(None, "Deep3DFaceRecon epoch_20.pth (default: registry 'deep3d_recon')")
    inception: str | None = option(None, "pt_inception-2015-12-05-6726825d.pth (default: registry 'fid_inception')")
    expression_mode: Literal["reface", "aligned"] = option(
        "reface", "Deep3DFaceRecon input: REFace's whole image at 512, or 5-point aligned 224 crops")
    id_mask_from: Literal["target", "swap"] = option(
        "target", "face mask applied to a swap before IR-SE50: its target's (as REFace) or its own")
    bootstrap: int = option(1000, "bootstrap resamples for per-pair metrics")
    set_resamples: int = option(20, "bootstrap resamples for FID/KID (each costs one FID)")
    reference_limit: int = option(0, "use at most this many reference images for FID (0: all)")
    grid: int = option(60, "pairs shown in the HTML image grid, worst first")
