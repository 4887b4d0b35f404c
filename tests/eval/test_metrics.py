"""Metric behaviour on real photos: zero against itself, the expected error against a mirror, planted retrieval."""

from __future__ import annotations

import numpy as np
import pytest

from appleswap.eval import dlib_id, gaze, lighting, skin, stats
from appleswap.eval.flicker import flicker_scores
from appleswap.eval.identity import retrieval_hits
from appleswap.eval.masks import SKIN_CLASSES, mesh_classes, select
from appleswap.face_metrics import expression, pose
from appleswap.face_metrics.mesh import face_mesh_points
from appleswap.files import load_image


@pytest.fixture(scope="module")
def frontal(faces_dir):
    image = load_image(faces_dir / "obama1.jpg")
    mirror = np.ascontiguousarray(image[:, ::-1])
    return image, face_mesh_points(image), mirror, face_mesh_points(mirror)


def test_self_scores_are_zero(frontal):
    image, mesh, _, _ = frontal
    again = face_mesh_points(image.copy())
    assert pose.pose_error(pose.pnp_angles(mesh, image.shape), pose.pnp_angles(again, image.shape)) < 1e-6
    assert np.linalg.norm(expression.mesh_expression(mesh) - expression.mesh_expression(again)) < 1e-6
    assert gaze.gaze_error(gaze.gaze_vector(mesh), gaze.gaze_vector(again))[0] == pytest.approx(0.0, abs=1e-6)
    classes = mesh_classes(mesh, image.shape[:2])
    assert select(classes, SKIN_CLASSES).sum() > 1000
    assert skin.skin_tone_difference(image, image, select(classes, SKIN_CLASSES)) == 0.0
    assert lighting.lighting_difference(image, image, classes > 0) == pytest.approx(0.0, abs=1e-9)


def test_mirror_flips_yaw_and_roll(frontal):
    image, mesh, mirror, mirror_mesh = frontal
    original = pose.pnp_angles(mesh, image.shape)
    flipped = pose.pnp_angles(mirror_mesh, mirror.shape)
    # MediaPipe's mesh is not exactly mirror-symmetric and the face is off-centre (perspective): a few degrees
    assert abs(original[0]) > 5.0 and flipped[0] == pytest.approx(-original[0], abs=3.0)
    assert flipped[2] == pytest.approx(-original[2], abs=1.5)
    assert flipped[1] == pytest.approx(original[1], abs=2.0)
    expected = np.hypot(2 * original[0], 2 * original[2])
    assert pose.pose_error(original, flipped) == pytest.approx(expected, abs=4.0)
    # gaze mirrors horizontally too
    g, gm = gaze.gaze_vector(mesh), gaze.gaze_vector(mirror_mesh)
    assert gm[0] * g[0] < 0 and abs(gm[0] + g[0]) < 0.08 and gm[1] == pytest.approx(g[1], abs=0.05)


def test_skin_lighting_and_flicker_detect_planted_changes(frontal):
    image, mesh, _, _ = frontal
    image = np.ascontiguousarray(image[::4, ::4])  # quarter size keeps the Lab conversions fast
    classes = mesh_classes(mesh / 4, image.shape[:2])
    warmer = np.clip(image.astype(int) + [25, 5, -15], 0, 255).astype(np.uint8)
    assert skin.skin_tone_difference(warmer, image, select(classes, SKIN_CLASSES)) > 3.0
    ramp = np.linspace(0.6, 1.2, image.shape[1])[None, :, None]
    relit = np.clip(image * ramp, 0, 255).astype(np.uint8)
    assert lighting.lighting_difference(relit, image, classes > 0) > 3.0
    still = flicker_scores([image, image, image], [image, image, image])
    assert np.all(still == 0)
    noisy = [np.clip(image.astype(int) + np.random.default_rng(i).integers(-20, 20, image.shape), 0, 255)
             .astype(np.uint8) for i in range(3)]
    assert np.all(flicker_scores(noisy, [image] * 3) > 1.0)


def test_retrieval_returns_the_planted_match():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(50, 512))
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    truth = rng.permutation(50)[:20]
    queries = gallery[truth] + rng.normal(scale=0.02, size=(20, 512))
    assert retrieval_hits(queries, gallery, truth, 1).tolist() == [1.0] * 20
    wrong = (truth + 1) % 50
    assert retrieval_hits(queries, gallery, wrong, 1).sum() == 0
    queries[3] = np.nan  # a missing swap is a miss
    assert retrieval_hits(queries, gallery, truth, 5)[3] == 0.0


def test_dlib_fallback_same_person_beats_cross_person(faces_dir):
    recogniser = dlib_id.DlibRecognizer()
    embeddings = {}
    for name in ("obama.jpg", "obama1.jpg", "biden.jpg", "biden2.jpg"):
        image = load_image(faces_dir / name)
        embeddings[name] = recogniser.embed(image, dlib_id.mesh_box(face_mesh_points(image)))
    same = [embeddings["obama.jpg"] @ embeddings["obama1.jpg"], embeddings["biden.jpg"] @ embeddings["biden2.jpg"]]
    cross = [embeddings[a] @ embeddings[b] for a in ("obama.jpg", "obama1.jpg") for b in ("biden.jpg", "biden2.jpg")]
    assert min(same) > max(cross)


def test_bootstrap_and_paired_difference():
    rng = np.random.default_rng(1)
    values = rng.normal(2.0, 1.0, 400)
    summary = stats.bootstrap_mean(np.append(values, np.nan))
    assert summary["ci_low"] < 2.0 < summary["ci_high"] and summary["missing"] == 1 and summary["n"] == 400
    better = values - 0.5 + rng.normal(0, 0.1, 400)
    result = stats.paired_test(values, better)
    assert result["significant"] and result["p_value"] < 0.01 and result["diff"] == pytest.approx(-0.5, abs=0.05)
    assert result["ci_low"] < -0.5 < result["ci_high"] < 0 and result["p_wilcoxon"] < 0.01
    noise = values + rng.normal(0, 0.1, 400)
    assert not stats.paired_test(values, noise)["significant"]


def test_paired_test_matches_textbook_values_and_its_wording():
    """Student's paired t on a hand-computable set: d = (1, 2, 3, 4, 5) - 0 -> mean 3, sd sqrt(2.5), t = 3 / sqrt(0.5)
    = 4.2426 with 4 df; p (two-sided) = 0.01324 (t table). The verdict follows p < alpha and nothing else."""
    from appleswap.eval.compare import verdict

    a = np.zeros(5)
    b = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    result = stats.paired_test(a, b)
    assert result["diff"] == pytest.approx(3.0) and result["p_value"] == pytest.approx(0.013236, abs=2e-6)
    half_width = 2.776445 * np.sqrt(2.5) / np.sqrt(5)  # t(0.975, 4) * sd / sqrt(n)
    assert (result["ci_low"], result["ci_high"]) == pytest.approx((3 - half_width, 3 + half_width), abs=1e-5)
    assert result["significant"] and verdict({**result, "better": "B"}).startswith("significant (p < 0.05)")
    strict = stats.paired_test(a, b, alpha=0.01)
    assert not strict["significant"] and verdict(strict) == "not significant (p >= 0.01)"
    # p = 0.51 must never read "significant" (the finding in issue 24)
    shifted = stats.paired_test(np.zeros(4), np.array([-1.0, 1.0, 2.0, -1.3]))
    assert shifted["p_value"] > 0.3 and not shifted["significant"] and "not significant" in verdict(shifted)


def test_helper_scorers_for_other_stages(faces_dir, tmp_path):
    from appleswap.eval.helpers import ExpressionScorer, IdentityScorer, PoseScorer

    images = [load_image(faces_dir / n) for n in ("obama.jpg", "obama1.jpg", "biden2.jpg")]
    pose_scorer = PoseScorer(str(tmp_path))
    assert pose_scorer.fallback and pose_scorer(images[:1]).shape == (1, 3)
    assert ExpressionScorer(str(tmp_path))(images[:1]).shape == (1, 7)
    identity = IdentityScorer(str(tmp_path))
    same, cross = identity.similarity(images[:1] * 2, images[1:3])
    assert same > cross


def test_largest_face_is_scored(faces_dir):
    image = load_image(faces_dir / "two_people.jpg")
    mesh = face_mesh_points(image)
    small = np.ascontiguousarray(image.copy())
    x0, y0 = mesh[:, :2].min(axis=0).astype(int)
    x1, y1 = mesh[:, :2].max(axis=0).astype(int)
    small[y0:y1, x0:x1] = 128  # hide the chosen face: another (smaller) face must now be found
    other = face_mesh_points(small)
    assert other is not None and np.ptp(other[:, 0]) * np.ptp(other[:, 1]) <= np.ptp(mesh[:, 0]) * np.ptp(mesh[:, 1])


def test_compare_reports_flags_paired_and_set_differences():
    from appleswap.eval.compare import compare_reports, format_comparison

    rng = np.random.default_rng(0)
    pose_a = rng.normal(3.0, 1.0, 200)
    rows_a = [{"id": str(i), "pose": float(v)} for i, v in enumerate(pose_a)]
    rows_b = [{"id": str(i), "pose": float(v - 1.0)} for i, v in enumerate(pose_a)]
    a = {"metrics": {"pose": {"mean": 3.0}, "fid": {"mean": 10.0, "ci_low": 9.0, "ci_high": 11.0}}, "per_pair": rows_a}
    b = {"metrics": {"pose": {"mean": 2.0}, "fid": {"mean": 10.5, "ci_low": 9.5, "ci_high": 11.5}}, "per_pair": rows_b}
    results = {row["metric"]: row for row in compare_reports(a, b)}
    assert results["pose"]["significant"] and results["pose"]["better"] == "B"
    assert results["pose"]["diff"] == pytest.approx(-1.0)
    assert not results["fid"]["significant"] and results["fid"]["test"].startswith("interval overlap")
    table = format_comparison(list(results.values()))
    assert "significant (p < 0.05), B better" in table and "95% intervals overlap (no test)" in table


def test_alignment_crops_put_the_face_where_the_networks_expect_it(frontal):
    from appleswap.face_metrics.mesh import five_points
    from appleswap.identity.align import ARCFACE_TEMPLATE_112 as ARCFACE_TEMPLATE
    from appleswap.identity.align import arcface_crop

    image, mesh, _, _ = frontal
    points = five_points(mesh)
    crop = arcface_crop(image, points, size=224)  # 2x the ArcFace template, large enough for the mesh
    found = five_points(face_mesh_points(crop))
    assert np.abs(found[:2] - ARCFACE_TEMPLATE[:2] * 2).max() < 8  # the eyes land on the template
    aligned = expression.aligned_crop(image, points)
    eyes = five_points(face_mesh_points(aligned))[:2]
    # BFM eye centres are 0.62 apart and rescale is 102: ~63 px apart, centred horizontally in the 224 crop
    assert np.linalg.norm(eyes[1] - eyes[0]) == pytest.approx(0.621 * 102, abs=8)
    assert eyes[:, 0].mean() == pytest.approx(112, abs=8)
