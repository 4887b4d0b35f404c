"""Per-triplet scores of ``appleswap pseudo`` for the student's filters (docs/method.md, with working thresholds).

* ``aes``: LAION aesthetic score of the swap (when the CLIP + head weights are present);
* ``id_similarity``: ArcFace cosine between the swap and the source photo (when the ArcFace weights are present);
* ``pose_error`` / ``expression_error``: face-mesh pose (degrees) and expression distances between the swap and
  the target (MediaPipe mesh, no weight file). A part whose weights are missing is left out (logged once); the
  student's filter then drops triplets lacking a score it is asked to threshold.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from appleswap.weights import MissingWeightError, locate

log = logging.getLogger(__name__)


def mesh_agreement(swap: np.ndarray, target: np.ndarray) -> dict[str, float]:
    """Pose and expression distances between two faces; empty when either face is not found."""
    from appleswap.face_metrics.expression import mesh_expression
    from appleswap.face_metrics.mesh import face_mesh_points
    from appleswap.face_metrics.pose import pnp_angles, pose_error

    mesh_a, mesh_b = face_mesh_points(swap), face_mesh_points(target)
    if mesh_a is None or mesh_b is None:
        return {}
    pose = float(pose_error(pnp_angles(mesh_a, swap.shape), pnp_angles(mesh_b, target.shape)))
    expression = float(np.linalg.norm(mesh_expression(mesh_a) - mesh_expression(mesh_b)))
    return {"pose_error": pose, "expression_error": expression}


def build_scorer(config: Any, weights_dir: str | None, root: Path, device: torch.device) -> Callable:
    """``scorer(pair, swap_uint8) -> dict`` with every score whose model is available."""
    from appleswap.train.data import image_path, load_rgb

    id_loss = aesthetic = None
    try:
        from appleswap.train.losses import build_identity_loss

        id_loss = build_identity_loss("arcface", locate("arcface_simswap", weights_dir, explicit=config.arcface),
                                      device)
    except MissingWeightError as error:
        log.warning("pseudo scores: no id_similarity (%s)", str(error).splitlines()[0])
    try:
        from appleswap.preprocess.aesthetic import AestheticScorer

        aesthetic = AestheticScorer.from_files(locate("clip_vit_l14", weights_dir),
                                               locate("laion_aesthetic_head", weights_dir), device=device)
    except (MissingWeightError, KeyError) as error:
        log.warning("pseudo scores: no aes (%s)", str(error).splitlines()[0])

    def scorer(pair: Any, swap: np.ndarray) -> dict[str, float]:
        target = (load_rgb(image_path(root, pair.target), swap.shape[0]).permute(1, 2, 0).numpy() * 255 + 0.5)
        scores = mesh_agreement(swap, target.astype(np.uint8))
        if id_loss is not None:
            tensor = torch.from_numpy(swap).permute(2, 0, 1)[None].float().div(255).to(device)
            source = load_rgb(image_path(root, pair.source), swap.shape[0])[None].to(device)
            scores["id_similarity"] = float(1.0 - id_loss(tensor, source)[0])
        if aesthetic is not None:
            scores["aes"] = float(aesthetic.score([swap])[0])
        return scores
    return scorer
