"""The runner with the optional networks (tiny checkpoints with the real key names, found through the registry):
BiSeNet parser + DeepLabV3+ occlusion intersection, the LAION aesthetic score / filter, and 3DDFA-V3 landmarks."""

from __future__ import annotations

import importlib.util
import json

import numpy as np
import pytest
import torch

from appleswap.faces.align import align_face
from appleswap.faces.detect import detect_faces
from appleswap.faces.segmap import GLASSES, classes_from_colors, colorize, face_mask
from appleswap.files import load_image, save_image
from appleswap.preprocess.condition import build_condition, lowfreq_copy
from appleswap.preprocess.layout import FacePaths
from appleswap.preprocess.runner import PreprocessConfig, run_preprocess

NEEDED = ("appleswap.faces.parsing", "appleswap.faces.occlusion", "appleswap.preprocess.aesthetic")
pytestmark = pytest.mark.skipif(any(importlib.util.find_spec(m) is None for m in NEEDED),
                                reason="segmenter modules not installed")
TINY_DEEPLAB = {"stage_blocks": (1, 1, 1, 1), "stem_channels": 16, "base_channels": 8, "channels": 16,
                "c1_channels": 8}


@pytest.fixture(scope="module")
def weights(tmp_path_factory, aligned_dir):
    from appleswap.faces.occlusion import DeepLabConfig, OcclusionSegmenter
    from tests.fixtures.tiny_segmenters import aesthetic_head_state, write_bisenet, write_deeplab, write_tiny_clip

    root = tmp_path_factory.mktemp("weights")
    (root / "segmentation").mkdir()
    (root / "aesthetic").mkdir()
    write_bisenet(root / "segmentation" / "FaceParser.pth", seed=0)
    occlusion = write_deeplab(root / "segmentation" / "deeplabv3_iter_27600.pth", seed=0)
    probe = OcclusionSegmenter.from_file(occlusion, device="cpu", config=DeepLabConfig(**TINY_DEEPLAB))
    scores = probe.probabilities(load_image(aligned_dir / "n000001" / "obama1.jpg"))
    write_deeplab(occlusion, seed=0, class1_shift=float((scores[1] - scores[0]).median()))  # about half visible
    write_tiny_clip(root / "clip" / "clip-vit-large-patch14")
    torch.save(aesthetic_head_state(), root / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth")
    return root


@pytest.fixture(scope="module")
def aligned_dir(tmp_path_factory, faces_dir):
    folder = tmp_path_factory.mktemp("aligned") / "n000001"
    for name in ("obama1", "biden2"):
        photo = load_image(faces_dir / f"{name}.jpg")
        crop = align_face(photo, detect_faces(photo)[0].keypoints, size=512).image
        save_image(folder / f"{name}.jpg", crop)
    return folder.parent


@pytest.fixture(scope="module")
def tiny_occlusion():
    """The real DeepLabV3+ at the tiny width the fixture checkpoint has (the runner loads the default width)."""
    from appleswap.faces.occlusion import DeepLabConfig, OcclusionSegmenter

    original = OcclusionSegmenter.from_file.__func__

    def from_file(cls, path, device=None, flip="none", config=None):
        return original(cls, path, device=device, flip=flip, config=config or DeepLabConfig(**TINY_DEEPLAB))

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(OcclusionSegmenter, "from_file", classmethod(from_file))
        yield OcclusionSegmenter


@pytest.fixture(scope="module")
def full_run(weights, aligned_dir, tmp_path_factory, tiny_occlusion):
    config = PreprocessConfig(aligned=True, parser="auto", occlusion="auto", aesthetic=True)
    out = tmp_path_factory.mktemp("net_out")
    summary = run_preprocess(aligned_dir, out, config, progress=False, weights_dir=weights, device="cpu")
    return out, summary


def test_parser_occlusion_intersection_and_scores(weights, full_run, tiny_occlusion):
    from appleswap.faces.parsing import FaceParser
    from appleswap.preprocess.aesthetic import AestheticScorer

    out, summary = full_run
    assert summary["faces"] == 2, summary
    parser = FaceParser.from_file(weights / "segmentation" / "FaceParser.pth", device="cpu")
    occlusion = tiny_occlusion.from_file(weights / "segmentation" / "deeplabv3_iter_27600.pth", device="cpu")
    scorer = AestheticScorer.from_files(weights / "clip" / "clip-vit-large-patch14",
                                        weights / "aesthetic" / "sac+logos+ava1-l14-linearMSE.pth", device="cpu")
    paths = FacePaths(out, "n000001", "obama1")
    image = load_image(paths.image)
    classes = parser.parse(image)
    visible = occlusion.visible(image)
    assert 0.01 < visible.mean() < 0.99  # the random tiny model really cuts the mask
    assert np.array_equal(load_image(paths.png("segmap")), colorize(classes))
    inter_mask = np.asarray(load_image(paths.png("mask_intersection")))[..., 0] > 0
    assert np.array_equal(inter_mask, face_mask(classes) & visible)
    inter = np.where(visible, classes, 0)
    lm = load_image(paths.lm68, min_side=1)
    iris = load_image(paths.iris, min_side=1)
    expected = build_condition(image, inter.astype(np.uint8), lm, iris)
    assert np.array_equal(load_image(paths.png("blur")), expected)
    scores = json.loads((out / "score.json").read_text())
    assert list(scores) == ["n000001/biden2", "n000001/obama1"]
    assert scores["n000001/obama1"]["aes"] == pytest.approx(scorer.score([image])[0], abs=1e-4)


def test_glasses_tint_from_parser_classes(full_run):
    """Wherever the parser (inside the intersection) says eye_g, the condition is the tinted low-pass copy."""
    out, _ = full_run
    paths = FacePaths(out, "n000001", "biden2")
    image = load_image(paths.image)
    inter = classes_from_colors(load_image(paths.png("segmap_intersection")))
    dots = (load_image(paths.lm68, min_side=1).sum(-1) > 0) | (load_image(paths.iris, min_side=1).sum(-1) > 0)
    glasses = (inter == GLASSES) & ~dots
    condition = load_image(paths.png("blur"))
    tinted = np.clip(np.rint(lowfreq_copy(image) * 0.9 + np.array([25.5, 0, 25.5])), 0, 255)
    assert np.abs(condition[glasses].astype(int) - tinted[glasses]).max(initial=0) <= 1
    plain = face_mask(inter) & ~glasses & ~dots
    assert np.array_equal(condition[plain], lowfreq_copy(image)[plain])


def test_min_aesthetic_filters_faces(weights, aligned_dir, tmp_path):
    first = tmp_path / "scores"
    run_preprocess(aligned_dir, first, PreprocessConfig(aligned=True, aesthetic=True), progress=False,
                   weights_dir=weights, device="cpu")
    scores = {k: v["aes"] for k, v in json.loads((first / "score.json").read_text()).items()}
    assert len(set(scores.values())) == 2
    threshold = float(np.mean(list(scores.values())))
    out = tmp_path / "filtered"
    summary = run_preprocess(aligned_dir, out, PreprocessConfig(aligned=True, min_aesthetic=threshold),
                             progress=False, weights_dir=weights, device="cpu")
    keep = max(scores, key=scores.get).split("/")[1]
    drop = min(scores, key=scores.get).split("/")[1]
    assert summary["faces"] == 1 and summary["status"] == {"ok": 1, "filtered": 1}
    assert FacePaths(out, "n000001", keep).png("blur").is_file()
    assert not FacePaths(out, "n000001", drop).png("blur").exists()
    assert json.loads((out / "score.json").read_text()).keys() == scores.keys()  # filtered faces keep their score


def test_parity_option_reaches_the_segmenters(weights, tiny_occlusion):
    from appleswap.parity import apply_parity
    from appleswap.preprocess.worker import load_segmenters

    for parity, flip in ((False, "none"), (True, "only")):
        config = apply_parity(PreprocessConfig(aligned=True, parser="auto", occlusion="auto", parity=parity),
                              "preprocess")
        parser, occlusion, _ = load_segmenters(config, weights, "cpu")
        assert parser.parity_double_norm is parity and occlusion.flip == flip


def test_missing_weights_are_named(aligned_dir, tmp_path):
    from appleswap.weights import MissingWeightError

    with pytest.raises(MissingWeightError, match="FaceParser.pth"):
        run_preprocess(aligned_dir, tmp_path / "o", PreprocessConfig(aligned=True, parser="auto"), progress=False,
                       weights_dir=tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="neither an existing file"):
        run_preprocess(aligned_dir, tmp_path / "o", PreprocessConfig(aligned=True, occlusion="nope.pth"),
                       progress=False, weights_dir=tmp_path / "empty")


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("appleswap.faces.tddfa") is None, reason="3DDFA-V3 not installed")
def test_tddfa_landmarks_get_mediapipe_iris(aligned_dir, tmp_path):
    from tests.fixtures.tiny_tddfa import build_tiny_tddfa

    weights = build_tiny_tddfa(tmp_path / "w")
    out = tmp_path / "out"
    run_preprocess(aligned_dir, out, PreprocessConfig(aligned=True, landmarks="3ddfa-v3", limit=1),
                   progress=False, weights_dir=weights, device="cpu")
    record = json.loads((out / "manifest" / "n000001" / "biden2.json").read_text())
    if record["status"] == "error":  # random tiny RetinaFace may see no face: then the error names it
        assert "no face" in record["error"]
        return
    face = record["faces"][0]
    assert len(face["lm68"]) == 68 and len(face["iris"]) == 10
    assert FacePaths(out, "n000001", "biden2").png("blur").is_file()
    # the fitted 3DMM coefficients are kept (the reference throws them away)
    assert len(face["tddfa"]["exp"]) == 64 and len(face["tddfa"]["id"]) == 80
    assert (out / face["tddfa"]["coeffs"]).is_file()
