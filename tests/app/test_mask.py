"""The paste-back region (issue 7): the mesh face of the target/generated crops, the ellipse as fallback/option."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from appleswap.app.swapper import ALIGN_SIZE, SwapConfig, ellipse_mask
from appleswap.faces.align import align_face
from appleswap.faces.detect import detect_faces
from appleswap.faces.landmarks import get_landmark_provider
from appleswap.faces.mesh_mask import mesh_classes
from appleswap.faces.segmap import CLASS_IDS, face_mask
from appleswap.files import load_image
from tests.app.conftest import configured

EARS = (CLASS_IDS["l_ear"], CLASS_IDS["r_ear"])
NO_FACE = np.full((ALIGN_SIZE, ALIGN_SIZE, 3), 120, np.uint8)


@pytest.fixture(scope="module")
def crops(faces_dir):
    """name -> (photo, aligned 512 crop, the mesh class map of the crop)."""
    landmarker = get_landmark_provider("mediapipe")
    out = {}
    for name in ("biden2", "obama1"):
        photo = load_image(faces_dir / f"{name}.jpg")
        crop = align_face(photo, detect_faces(photo)[0].keypoints, ALIGN_SIZE).image
        mesh = landmarker.mesh(crop)
        out[name] = (photo, crop, mesh_classes(mesh, crop.shape))
    return out


def test_mesh_mask_follows_the_face(engine, crops):
    swapper = configured(engine, face_mask="mesh", face_mask_blur=0.06).swapper
    _, crop, classes = crops["obama1"]
    mask = swapper.paste_mask(crop, NO_FACE)  # the generated crop shows no face: the target's alone
    assert mask.dtype == np.float32 and mask.shape == (ALIGN_SIZE, ALIGN_SIZE) and set(np.unique(mask)) == {0, 1}
    face = face_mask(classes) & ~np.isin(classes, EARS)
    assert mask[face].all()  # the whole face, dilated
    ys, xs = np.nonzero(face)
    grown = np.nonzero(mask)
    margin = 0.06 * ALIGN_SIZE + 1 + 0.01 * ALIGN_SIZE + 2
    assert grown[1].min() >= xs.min() - margin and grown[1].max() <= xs.max() + margin
    assert grown[0].min() >= ys.min() - margin and grown[0].max() <= ys.max() + margin
    for corner in ((0, 0), (0, 511), (511, 0), (511, 511)):
        assert mask[corner] == 0
    assert not np.array_equal(mask, ellipse_mask())


def test_union_of_target_and_generated(engine, crops):
    swapper = configured(engine, face_mask="mesh").swapper
    _, biden, _ = crops["biden2"]
    _, obama, _ = crops["obama1"]
    from_generated = swapper.paste_mask(NO_FACE, obama)
    assert np.array_equal(from_generated, swapper.paste_mask(obama, NO_FACE))
    both = swapper.paste_mask(biden, obama)
    assert np.array_equal(both, np.maximum(swapper.paste_mask(biden, NO_FACE), from_generated))
    assert both.sum() > from_generated.sum()


def test_ellipse_option_and_fallback(engine, crops):
    _, crop, _ = crops["biden2"]
    assert np.array_equal(configured(engine, face_mask="ellipse").swapper.paste_mask(crop, crop), ellipse_mask())
    assert np.array_equal(configured(engine, face_mask="mesh").swapper.paste_mask(NO_FACE, NO_FACE), ellipse_mask())
    with pytest.raises(ValueError, match="--face-mask"):
        dataclasses.replace(SwapConfig(), face_mask="oval").check()


def test_swap_changes_only_the_mesh_face(engine, identity, crops):
    photo = crops["biden2"][0]
    outcomes = {kind: configured(engine, face_mask=kind).swap_image(identity, photo, "biden2.jpg")
                for kind in ("mesh", "ellipse")}
    for outcome in outcomes.values():
        outside = outcome.mask == 0
        assert np.array_equal(outcome.image[outside], photo[outside])  # exactly the input outside the mask
        inside = outcome.mask > 0.99
        assert np.abs(outcome.image[inside].astype(int) - photo[inside]).mean() > 5
    changed = {kind: np.abs(o.image.astype(int) - photo).sum(axis=2) > 0 for kind, o in outcomes.items()}
    assert changed["mesh"].sum() != changed["ellipse"].sum()
    assert (outcomes["mesh"].mask > 0).sum() != (outcomes["ellipse"].mask > 0).sum()


def test_face_mask_flag():
    from appleswap.cli import build_parser
    from appleswap.config import resolve_config

    parser = build_parser()
    args = parser.parse_args(["swap", "-s", "a.jpg", "-t", "b.jpg", "-o", "c.jpg", "--face-mask", "ellipse"])
    assert resolve_config(SwapConfig, args, {}).face_mask == "ellipse"
    args = parser.parse_args(["swap", "-s", "a.jpg", "-t", "b.jpg", "-o", "c.jpg"])
    assert resolve_config(SwapConfig, args, {}).face_mask == "mesh"  # the default
    with pytest.raises(SystemExit):
        parser.parse_args(["swap", "-s", "a.jpg", "-t", "b.jpg", "-o", "c.jpg", "--face-mask", "oval"])
