"""`appleswap swap` as a new user runs it: tiny weights from --weights-dir, a folder with bad files in it."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image

from appleswap.app.swap import plan_jobs
from appleswap.cli import main
from appleswap.provenance.labels import read_image_provenance
from tests.fixtures.tiny_flux import TINY_IMAGE_SIZE


def test_missing_weights_message(tmp_path, faces_dir, capsys):
    code = main(["swap", "-s", str(faces_dir / "obama.jpg"), "-t", str(faces_dir / "biden2.jpg"),
                 "-o", str(tmp_path / "out.png"), "--weights-dir", str(tmp_path / "empty"), "--device", "cpu"])
    err = capsys.readouterr().err
    assert code == 2
    assert "appleswap swap: error:" in err and str(tmp_path / "empty") in err
    assert "5 weight(s) missing" in err and "weights check" in err
    for name in ("flux", "pulid_flux", "apple_student", "antelopev2", "eva02_clip_l_336"):
        assert f"missing weights '{name}'" in err


def test_swap_folder_with_bad_files(tmp_path, faces_dir, app_weights, capsys):
    targets = tmp_path / "targets"
    targets.mkdir()
    shutil.copy(faces_dir / "biden2.jpg", targets / "biden2.jpg")
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(targets / "empty_wall.png")
    (targets / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    out = tmp_path / "out"
    config = tmp_path / "swap.toml"
    config.write_text(f"[swap]\nsize = {TINY_IMAGE_SIZE}\nsteps = 1\nseed = 1\n")
    code = main(["swap", "-s", str(faces_dir / "obama.jpg"), "-t", str(targets), "-o", str(out), "--config",
                 str(config), "--seed", "3", "--weights-dir", str(app_weights), "--device", "cpu", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 1  # some targets failed, the others were written
    assert sorted(p.name for p in out.iterdir()) == ["obama-biden2.jpg"]
    assert "broken.jpg: FAILED" in printed and "empty_wall.png: FAILED" in printed and "no face" in printed
    record = read_image_provenance(out / "obama-biden2.jpg")
    assert record["ai_generated"] and record["source"] == ["obama.jpg"] and "student" in record["model"]
    assert (record["steps"], record["seed"]) == (1, 3)  # config file, then the flag over it
    capsys.readouterr()
    assert main(["verify", str(out / "obama-biden2.jpg")]) == 0
    shown = capsys.readouterr().out  # label, signed credentials and watermark, all three
    assert "labelled AI-generated" in shown and "C2PA valid, AI-generated" in shown and "watermark FOUND" in shown


def test_source_without_face_exits_2(tmp_path, faces_dir, app_weights, capsys):
    blank = tmp_path / "blank.png"
    Image.fromarray(np.full((200, 200, 3), 90, np.uint8)).save(blank)
    code = main(["swap", "-s", str(blank), "-t", str(faces_dir / "biden2.jpg"), "-o", str(tmp_path / "o.png"),
                 "--weights-dir", str(app_weights), "--device", "cpu", "--size", str(TINY_IMAGE_SIZE), "--steps", "1"])
    assert code == 2 and "blank.png" in capsys.readouterr().err


def test_plan_jobs(tmp_path, faces_dir):
    assert plan_jobs(faces_dir / "obama.jpg", tmp_path / "x.png", ["s.jpg"], "{source}-{target}{ext}") == [
        (faces_dir / "obama.jpg", tmp_path / "x.png")]
    jobs = plan_jobs(faces_dir / "obama.jpg", tmp_path, ["a/me.png"], "{source}-{target}{ext}")
    assert jobs[0][1] == tmp_path / "me-obama.jpg"
    folder = plan_jobs(faces_dir, tmp_path / "o", ["me.png"], "{index}_{target}{ext}")
    assert len(folder) == 10 and folder[0][1].parent == tmp_path / "o"
    with pytest.raises(ValueError, match="output folder"):
        plan_jobs(faces_dir, tmp_path / "o.png", ["me.png"], "{target}{ext}")
    clip = tmp_path / "clip.mov"
    clip.write_bytes(b"")
    with pytest.raises(ValueError, match=".mp4"):
        plan_jobs(clip, tmp_path / "o.avi", ["me.png"], "{target}{ext}")
    with pytest.raises(FileNotFoundError, match="nothing"):
        plan_jobs(tmp_path / "nothing", tmp_path, ["me.png"], "{target}{ext}")



def test_batch_goes_on_after_a_corrupt_video(engine, identity, tmp_path, faces_dir):
    from appleswap.app.swap import run_jobs

    bad = tmp_path / "bad.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypisom" + bytes(500))
    jobs = [(bad, tmp_path / "out" / "bad.mp4"), (faces_dir / "biden2.jpg", tmp_path / "out" / "b.png")]
    results = run_jobs(engine, identity, ["obama1.jpg"], jobs, progress=False)
    assert results[0]["status"] == "error" and "bad.mp4" in results[0]["error"]
    assert results[1]["status"] == "ok" and (tmp_path / "out" / "b.png").is_file()
    assert not (tmp_path / "out" / "bad.mp4").exists()


def test_video_without_a_face_fails_like_a_photo_without_one(engine, identity, tmp_path):
    """One rule for photos and videos: no face swapped means a failed target (exit 1 or 2), and no output."""
    from appleswap.app.swap import run_jobs
    from appleswap.app.video import write_video

    clip = write_video(tmp_path / "wall.mp4", [np.full((64, 64, 3), 120, np.uint8)] * 3, 10)
    output = tmp_path / "out" / "wall.mp4"
    [result] = run_jobs(engine, identity, ["obama.jpg"], [(clip, output)], progress=False)
    assert result["status"] == "error" and result["error"].endswith("no face found in the target")  # as for a photo
    assert not output.exists()
