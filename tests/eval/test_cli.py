"""End to end: `appleswap eval` on real photos (fallbacks, then tiny weights), cache reuse, HTML, compare."""

from __future__ import annotations

import json
import shutil

import pytest

from appleswap.cli import main

PAIRS = (("p0", "obama.jpg", "obama1.jpg"), ("p1", "biden.jpg", "biden2.jpg"))


@pytest.fixture()
def layout(tmp_path, faces_dir):
    """Sources/targets/swaps where each swap is a copy of its target (a perfect attribute match)."""
    swapped = tmp_path / "swapped"
    swapped.mkdir()
    lines = ["id,source,target"]
    for pair_id, source, target in PAIRS:
        shutil.copy(faces_dir / target, swapped / f"{pair_id}.jpg")
        lines.append(f"{pair_id},{source},{target}")
    (tmp_path / "pairs.csv").write_text("\n".join(lines) + "\n")
    return tmp_path, swapped


def _run(tmp_path, faces_dir, swapped, out, *extra, code=0):
    argv = ["eval", "--pairs", str(tmp_path / "pairs.csv"), "--sources", str(faces_dir), "--targets",
            str(faces_dir), "--swapped", str(swapped), "-o", str(out), "--cache", str(tmp_path / "cache"),
            "--bootstrap", "200", "--set-resamples", "3", "--log-level", "warning", *extra]
    assert main(argv) == code
    return json.loads((out / "report.json").read_text())


def test_bad_pairs_are_excluded_and_missing_swaps_count_as_failures(layout, faces_dir, capsys):
    """A 32x32 swap and a corrupt one are excluded with their reasons, a missing swap is a failure in the identity
    means (similarity 0, retrieval miss), and the report of the good pair still comes out (exit 1)."""
    from PIL import Image

    tmp_path, swapped = layout
    Image.new("RGB", (32, 32), (120, 90, 80)).save(swapped / "p1.jpg")  # too small
    (swapped / "p2.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # not decodable
    rows = (tmp_path / "pairs.csv").read_text() + "p2,obama1.jpg,biden.jpg\np3,biden2.jpg,obama.jpg\n"
    (tmp_path / "pairs.csv").write_text(rows)  # p3 has no swap file at all
    report = _run(tmp_path, faces_dir, swapped, tmp_path / "bad", "--weights-dir", str(tmp_path / "none"), code=1)
    excluded = {row["id"]: row["reason"] for row in report["excluded"]}
    assert set(excluded) == {"p1", "p2"}
    assert "too small" in excluded["p1"] and "not a readable image" in excluded["p2"]
    assert report["pairs"] == 2 and report["pairs_listed"] == 4 and report["missing_swaps"] == 1
    by_id = {row["id"]: row for row in report["per_pair"]}
    assert set(by_id) == {"p0", "p3"} and by_id["p3"]["swap"] is None
    assert by_id["p3"]["id_sim/dlib"] == 0.0 and by_id["p3"]["id_top1/dlib"] == 0.0 and by_id["p3"]["pose"] is None
    similarity = report["metrics"]["id_sim/dlib"]
    assert similarity["n"] == 2 and similarity["failures"] == 1  # the missing swap is in the mean, as a failure
    assert similarity["mean"] == pytest.approx(by_id["p0"]["id_sim/dlib"] / 2)
    assert report["metrics"]["id_top1/dlib"]["mean"] == 50.0 and report["metrics"]["pose"]["n"] == 1
    printed = capsys.readouterr().out
    assert "EXCLUDED pair p1" in printed and "1 missing swaps count as failures" in printed
    assert "Excluded pairs (2)" in (tmp_path / "bad" / "report.html").read_text()

    for name in ("p0.jpg", "p3.jpg"):  # now no pair is usable: a report that says why, exit 2
        Image.new("RGB", (16, 16)).save(swapped / name)
    empty = _run(tmp_path, faces_dir, swapped, tmp_path / "none_left", "--weights-dir", str(tmp_path / "none"),
                 code=2)
    assert empty["pairs"] == 0 and len(empty["excluded"]) == 4 and empty["metrics"] == {}


def test_fallback_run_cache_reuse_html_and_compare(layout, faces_dir, capsys):
    tmp_path, swapped = layout
    report = _run(tmp_path, faces_dir, swapped, tmp_path / "a", "--weights-dir", str(tmp_path / "none"))
    metrics = report["metrics"]
    assert set(report["fallbacks"]) == {"dlib", "pose_pnp", "mesh_expression", "mask_mesh"}
    assert metrics["id_top1/dlib"]["mean"] == 100.0  # each swap shows its source's person (retrieval in %)
    assert metrics["id_top1/dlib"]["unit"] == "%" and report["excluded"] == []
    for name in ("pose", "expression", "gaze", "skin", "lighting"):
        assert metrics[name]["mean"] == pytest.approx(0.0, abs=1e-6), name
    assert metrics["fid"]["mean"] is None and "not computed" in metrics["fid"]["note"]
    assert report["cache"]["hits"] == 0
    page = (tmp_path / "a" / "report.html").read_text()
    assert "id_sim/dlib" in page and page.count("data:image/jpeg;base64") == 6 and "http" not in page.lower()

    # a second swap folder: only the swaps are computed, sources and targets come from the cache
    other = tmp_path / "swapped2"
    other.mkdir()
    shutil.copy(faces_dir / "biden2.jpg", other / "p0.jpg")  # wrong person, wrong pose for pair p0
    shutil.copy(faces_dir / "biden2.jpg", other / "p1.jpg")
    second = _run(tmp_path, faces_dir, other, tmp_path / "b", "--weights-dir", str(tmp_path / "none"))
    per_metric_images = 4  # face, dlib, pose, expression, gaze: each has 4 cached sources/targets
    assert second["cache"]["hits"] >= 5 * per_metric_images
    assert second["per_pair"][0]["id_top1/dlib"] == 0.0 and second["per_pair"][0]["pose"] > 1.0
    capsys.readouterr()
    assert main(["eval", "compare", str(tmp_path / "a" / "report.json"), str(tmp_path / "b" / "report.json")]) == 0
    printed = capsys.readouterr().out
    assert "id_sim/dlib" in printed and "pose" in printed and "significant" in printed


def test_all_networks_from_tiny_weights(layout, faces_dir, eval_weights):
    tmp_path, swapped = layout
    report = _run(tmp_path, faces_dir, swapped, tmp_path / "full", "--weights-dir", str(eval_weights),
                  "--reference", str(faces_dir), "--reference-limit", "2", "--expression-mode", "aligned")
    metrics = report["metrics"]
    assert report["fallbacks"] == ["mask_mesh"]  # no parser weights in the tiny folder
    assert {"id_sim/arcface_irse50", "id_top5/glintr100", "fid", "kid"} <= set(metrics)
    assert "HopeNet" in report["networks"]["pose"] and "Deep3DFaceRecon" in report["networks"]["expression"]
    assert metrics["pose"]["mean"] == pytest.approx(0.0, abs=1e-4)  # HopeNet on identical pixels
    assert metrics["expression"]["mean"] == pytest.approx(0.0, abs=1e-4)
    assert metrics["fid"]["mean"] > 0 and metrics["fid"]["reference"] == 2  # swaps differ from the reference
    assert -1.0 <= metrics["id_sim/arcface_irse50"]["mean"] <= 1.0
