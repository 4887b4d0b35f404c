"""The authors' segmentation maps under ``--landmarks reference`` run in place (M2), and the masks' format (M3)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from appleswap.faces.segmap import COLORS, colorize
from appleswap.files import load_image
from appleswap.preprocess.layout import FacePaths
from appleswap.preprocess.runner import PreprocessConfig, run_preprocess

SKIN, NOSE, EYE_G = 1, 10, 6


def _authors_maps() -> tuple[np.ndarray, np.ndarray]:
    """A full class map (face ellipse, nose, glasses) and its occlusion intersection (a hand covers the chin)."""
    yy, xx = np.mgrid[:512, :512]
    full = np.zeros((512, 512), np.uint8)
    full[((yy - 270) / 190.0) ** 2 + ((xx - 256) / 150.0) ** 2 <= 1] = SKIN
    full[230:330, 230:282] = NOSE
    full[190:225, 150:362] = EYE_G
    intersection = full.copy()
    intersection[360:] = 0  # occluded
    return full, intersection


def _rgb_mask(classes: np.ndarray) -> np.ndarray:
    return np.repeat((COLORS[classes].any(-1).astype(np.uint8) * 255)[..., None], 3, axis=2)


def _write_authors_face(root, name: str, full: np.ndarray | None, intersection: np.ndarray) -> FacePaths:
    rng = np.random.default_rng(len(name))
    paths = FacePaths(root, "n000001", name)
    paths.base.mkdir(parents=True, exist_ok=True)
    Image.fromarray((rng.random((512, 512, 3)) * 255).astype(np.uint8)).save(paths.image, quality=95)
    lm = np.zeros((512, 512, 3), np.uint8)
    for x, y in rng.integers(120, 400, (68, 2)):
        lm[y - 4:y + 5, x - 4:x + 5] = (0, 255, 0)
    iris = np.zeros((512, 512, 3), np.uint8)
    iris[200:205, 200:205] = iris[200:205, 300:305] = (255, 0, 0)
    maps = {paths.lm68: lm, paths.iris: iris, paths.png("segmap_intersection"): colorize(intersection),
            paths.png("mask_intersection"): _rgb_mask(intersection)}
    if full is not None:
        maps.update({paths.png("segmap"): colorize(full), paths.png("mask"): _rgb_mask(full)})
    for path, array in maps.items():
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(array).save(path)
    return paths


@pytest.fixture(scope="module")
def in_place_run(tmp_path_factory):
    """The documented in-place command on a dataset in the authors' layout (one face without a full segmap)."""
    root = tmp_path_factory.mktemp("vgg")
    full, intersection = _authors_maps()
    both = _write_authors_face(root, "0001_01", full, intersection)
    only_intersection = _write_authors_face(root, "0002_01", None, intersection)
    before = {path: load_image(path, min_side=1) for path in root.rglob("*.png")}
    summary = run_preprocess(root, root, PreprocessConfig(aligned=True, landmarks="reference"), progress=False)
    assert summary["status"] == {"ok": 2}
    return both, only_intersection, before, (full, intersection)


def test_in_place_reference_run_keeps_the_authors_full_maps(in_place_run):
    both, only_intersection, before, _ = in_place_run
    for kind in ("segmap", "mask", "segmap_intersection", "mask_intersection"):
        path = both.png(kind)
        np.testing.assert_array_equal(load_image(path, min_side=1), before[path], err_msg=kind)
    # no full map known: none is invented from the intersected one
    assert not only_intersection.png("segmap").exists() and not only_intersection.png("mask").exists()


def test_condition_blurs_the_intersection_only(in_place_run):
    both, _, _, (full, intersection) = in_place_run
    image = load_image(both.image)
    condition = load_image(both.png("blur"))
    dots = (load_image(both.lm68, min_side=1).sum(-1) > 0) | (load_image(both.iris, min_side=1).sum(-1) > 0)
    occluded = (full > 0) & (intersection == 0) & ~dots
    assert occluded.sum() > 1000
    np.testing.assert_array_equal(condition[occluded], image[occluded])  # sharp where the hand covers the face
    inside = (intersection == SKIN) & ~dots
    assert np.abs(condition[inside].astype(int) - image[inside]).mean() > 20  # blurred face


def test_masks_are_written_as_rgb_like_the_authors(tmp_path, faces_dir):
    out = tmp_path / "out"
    run_preprocess(faces_dir, out, PreprocessConfig(limit=1), progress=False)
    masks = sorted(out.rglob("mask*/*.png"))
    assert {path.parent.name for path in masks} == {"mask", "mask_intersection"}
    for path in masks:
        with Image.open(path) as image:
            assert image.mode == "RGB", path
            pixels = np.asarray(image)
        assert set(np.unique(pixels)) <= {0, 255} and (pixels[..., 0] == pixels[..., 2]).all()
