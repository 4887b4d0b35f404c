"""The preprocessing run end to end on real photos: layout, bad inputs, resume, SIGKILL, reference adapter, CLI."""

from __future__ import annotations

import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appleswap.faces.segmap import classes_from_colors, face_mask
from appleswap.files import load_image
from appleswap.preprocess.layout import FacePaths, discover_inputs
from appleswap.preprocess.runner import PreprocessConfig, run_preprocess

CONFIG = PreprocessConfig(face_selector="all", inpainting=True, preview=True)
CLI_FLAGS = ["--face-selector", "all", "--inpainting", "--preview", "--no-progress"]
GOOD = {"obama1": 1, "two_people": 2, "obama_partial_face": 1, "rgba": 1, "gray": 1, "deep16": 1, "cmyk": 1,
        "exif_rotated": 1}
BAD = {"corrupt": "not a readable image", "notimage": "not a readable image", "tiny": "too small",
       "bomb": "decompression bomb", "noface": "no face"}


def _bomb_png(path: Path, side: int = 20000) -> None:
    """A valid PNG header announcing side x side pixels with almost no data (a decompression-bomb probe)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))


def _make_inputs(folder: Path, faces_dir: Path) -> Path:
    folder.mkdir(parents=True)
    shutil.copy(faces_dir / "obama1.jpg", folder / "obama1.jpg")
    shutil.copy(faces_dir / "two_people.jpg", folder / "two_people.jpg")
    shutil.copy(faces_dir / "obama_partial_face.jpg", folder / "obama_partial_face.jpg")
    shutil.copy(faces_dir / "obama2_rgba.png", folder / "rgba.png")
    portrait = Image.open(faces_dir / "biden2.jpg").convert("RGB").resize((480, 480))
    portrait.convert("L").save(folder / "gray.jpg")
    deep = (np.asarray(portrait.convert("L"), dtype=np.uint16) * 257).astype(np.uint16)
    Image.fromarray(deep).save(folder / "deep16.png")
    portrait.convert("CMYK").save(folder / "cmyk.jpg")
    exif = Image.Exif()
    exif[274] = 6  # stored rotated: viewers (and load_image) turn it 90 degrees clockwise
    portrait.transpose(Image.Transpose.ROTATE_90).save(folder / "exif_rotated.jpg", exif=exif.tobytes())
    (folder / "corrupt.jpg").write_bytes((faces_dir / "obama1.jpg").read_bytes()[:3000])
    (folder / "notimage.jpg").write_text("this is not a photo\n")
    portrait.resize((40, 40)).save(folder / "tiny.jpg")
    _bomb_png(folder / "bomb.png")
    gradient = np.tile(np.linspace(40, 220, 320, dtype=np.uint8)[None, :, None], (240, 1, 3))
    Image.fromarray(gradient).save(folder / "noface.jpg")
    return folder


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory, faces_dir):
    return _make_inputs(tmp_path_factory.mktemp("in") / "photos", faces_dir)


@pytest.fixture(scope="module")
def full_run(inputs, tmp_path_factory):
    out = tmp_path_factory.mktemp("out") / "dataset"
    summary = run_preprocess(inputs, out, CONFIG, progress=False)
    return out, summary


def _records(out: Path) -> dict[str, dict]:
    import json

    return {r["key"]: r for r in json.loads((out / "manifest.json").read_text())["records"]}


def test_every_input_gets_a_record(full_run):
    out, summary = full_run
    assert summary["inputs"] == len(GOOD) + len(BAD) == summary["finished"]
    assert summary["faces"] == sum(GOOD.values())
    records = _records(out)
    for key, faces in GOOD.items():
        assert records[key]["status"] == "ok", records[key]
        assert len(records[key]["faces"]) == faces
    for key, reason in BAD.items():
        assert records[key]["status"] == "error" and reason in records[key]["error"], records[key]
        assert key in records[key]["error"]  # the message names the file
    assert records["exif_rotated"]["image_size"] == [480, 480]
    assert records["obama_partial_face"]["faces"][0]["padded"] is True
    assert not list(out.rglob("*.tmp"))


def test_reference_layout_and_condition(full_run):
    out, _ = full_run
    records = _records(out)
    names = [face["name"] for face in records["two_people"]["faces"]]
    assert names == ["two_people_0", "two_people_1"]
    for record in records.values():
        for face in record["faces"]:
            paths = FacePaths(out, "", face["name"])
            for path in (paths.image, paths.lm68, paths.iris, paths.png("segmap"), paths.png("mask"),
                         paths.png("segmap_intersection"), paths.png("mask_intersection"), paths.png("blur"),
                         paths.png("black")):
                assert path.is_file(), path
            assert len(face["lm68"]) == 68 and len(face["iris"]) == 10 and np.array(face["matrix"]).shape == (2, 3)
    paths = FacePaths(out, "", "obama1")
    image = load_image(paths.image)
    classes = classes_from_colors(load_image(paths.png("segmap_intersection")))
    mask = face_mask(classes)
    dots = (load_image(paths.lm68, min_side=1).sum(-1) > 0) | (load_image(paths.iris, min_side=1).sum(-1) > 0)
    condition = load_image(paths.png("blur"))
    assert image.shape == (512, 512, 3)
    assert np.array_equal(condition[~mask & ~dots], image[~mask & ~dots])  # sharp target outside the mask
    assert np.array_equal(load_image(paths.png("mask_intersection")) > 0, np.repeat(mask[..., None], 3, axis=2))
    assert (out / "preview.jpg").is_file() and (out / "manifest.json").is_file()


def test_resume_redoes_nothing_and_finishes_the_rest(full_run, inputs, tmp_path, caplog):
    out, _ = full_run
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    before = _tree(copy)
    (copy / "manifest" / "obama1.json").unlink()
    (copy / "condition_blended_image_blurdownsample8_segGlass_landmark_iris" / "obama1.png").unlink()
    mtimes = {p: p.stat().st_mtime_ns for p in copy.rglob("*.png") if "obama1" not in p.name}
    summary = run_preprocess(inputs, copy, CONFIG, progress=False)
    assert summary["processed_now"] == 1
    assert _tree(copy) == before
    assert all(p.stat().st_mtime_ns == m for p, m in mtimes.items())
    again = run_preprocess(inputs, copy, CONFIG, progress=False)
    assert again["processed_now"] == 0 and _tree(copy) == before
    assert "settings differ" not in caplog.text
    changed = run_preprocess(inputs, copy, PreprocessConfig(face_selector="largest"), progress=False)
    assert changed["processed_now"] == 0 and "settings differ" in caplog.text and "face_selector" in caplog.text


def test_sigkill_then_resume_matches_an_uninterrupted_run(full_run, inputs, tmp_path):
    out, _ = full_run
    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    command = [sys.executable, "-m", "appleswap.cli", "preprocess", str(inputs), str(killed), *CLI_FLAGS]
    process = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and process.poll() is None:
        if len(list((killed / "manifest").glob("*.json"))) >= 3:
            break
        time.sleep(0.01)
    assert process.poll() is None, "the run finished before it could be killed"
    os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=30)
    finished = len(list((killed / "manifest").glob("*.json")))
    assert 3 <= finished < len(GOOD) + len(BAD)
    for path in killed.rglob("*.png"):  # no visible file is half-written
        load_image(path, min_side=1)
    summary = run_preprocess(inputs, killed, CONFIG, progress=False)
    assert summary["processed_now"] == len(GOOD) + len(BAD) - finished
    assert _tree(killed) == _tree(out)


def test_reference_adapter_round_trip(full_run, tmp_path):
    """A dataset in the authors' layout (our output) read back with --aligned --landmarks reference."""
    out, _ = full_run
    again = tmp_path / "again"
    config = PreprocessConfig(aligned=True, landmarks="reference")
    summary = run_preprocess(out, again, config, progress=False)
    assert summary["faces"] == sum(GOOD.values()) and summary["status"] == {"ok": sum(GOOD.values())}
    for name in ("obama1", "two_people_1", "gray"):
        a, b = FacePaths(out, "", name), FacePaths(again, "", name)
        assert a.image.read_bytes() == b.image.read_bytes()  # aligned JPEG copied byte for byte
        for kind in ("blur", "segmap_intersection", "mask_intersection"):
            assert np.array_equal(load_image(a.png(kind)), load_image(b.png(kind))), (name, kind)
        assert a.lm68.read_bytes() == b.lm68.read_bytes() or np.array_equal(
            load_image(a.lm68, min_side=1), load_image(b.lm68, min_side=1))


def test_identity_tree_and_largest_face(faces_dir, tmp_path):
    tree = tmp_path / "vgg"
    for identity, name in (("n000001", "obama1"), ("n000002", "two_people")):
        (tree / identity).mkdir(parents=True)
        shutil.copy(faces_dir / f"{name}.jpg", tree / identity / "0001_01.jpg")
    items = discover_inputs(tree)
    assert [item.key for item in items] == ["n000001/0001_01", "n000002/0001_01"]
    out = tmp_path / "out"
    summary = run_preprocess(tree, out, PreprocessConfig(face_selector="largest"), progress=False)
    assert summary["faces"] == 2
    assert (out / "n000002" / "0001_01.jpg").is_file()
    assert (out / "n000002" / "3dmm" / "0001_01" / "0001_01_ldm68.png").is_file()
    assert (out / "manifest" / "n000002" / "0001_01.json").is_file()
    record = _records(out)["n000002/0001_01"]
    assert record["faces"][0]["n_faces_detected"] == 2 and len(record["faces"]) == 1


def test_cli(faces_dir, tmp_path):
    from appleswap.cli import main

    src = tmp_path / "two"
    src.mkdir()
    shutil.copy(faces_dir / "biden2.jpg", src / "biden2.jpg")
    shutil.copy(faces_dir / "obama1.jpg", src / "obama1.jpg")
    assert main(["preprocess", str(src), str(tmp_path / "o"), "--no-progress", "--workers", "2"]) == 0  # spawn pool
    for name in ("biden2", "obama1"):
        assert (tmp_path / "o" / "condition_blended_image_blurdownsample8_segGlass_landmark_iris" / f"{name}.png").is_file()
        assert (tmp_path / "o" / "manifest" / f"{name}.json").is_file()
    assert main(["preprocess", str(tmp_path / "nope"), str(tmp_path / "o2"), "--no-progress"]) == 2
    assert main(["preprocess", str(src), str(tmp_path / "o3"), "--landmarks", "reference", "--no-progress"]) == 2
