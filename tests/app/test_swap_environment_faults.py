"""`appleswap swap` under faults of the environment: a read-only weights folder (the prompt cache goes to the cache
folder), a disk that fills up at the final JPEG, a read-only output folder. The engine is loaded once (session
fixture); the read-only weights case runs the whole CLI, since loading is what it checks."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
from PIL import Image

from appleswap import files
from appleswap.app.swap import run_jobs
from appleswap.cli import error_line, main
from appleswap.files import EnvironmentFault
from tests.fixtures.tiny_flux import TINY_IMAGE_SIZE
from tests.test_environment_faults import DiskFull, _assert_complete, read_only


def _snapshot(folder):
    return {p.relative_to(folder).as_posix(): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in folder.rglob("*") if p.is_file()}


def test_swap_with_read_only_weights_caches_elsewhere(app_weights, tmp_path, faces_dir, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("APPLESWAP_CACHE", str(cache))
    weights = tmp_path / "weights"
    shutil.copytree(app_weights, weights)
    before = _snapshot(weights)
    output = tmp_path / "out" / "swap.jpg"
    previous = os.umask(0o022)
    try:
        with read_only(weights):
            code = main(["swap", "-s", str(faces_dir / "obama.jpg"), "-t", str(faces_dir / "biden2.jpg"),
                         "-o", str(output), "--weights-dir", str(weights), "--device", "cpu",
                         "--size", str(TINY_IMAGE_SIZE), "--steps", "1", "--no-progress", "--log-level", "error"])
    finally:
        os.umask(previous)
    assert code == 0, capsys.readouterr().err
    assert _snapshot(weights) == before  # nothing written into the weights folder
    assert list((cache / "text_embeddings").glob("text_*.safetensors"))  # the prompt cache is in the cache folder
    with Image.open(output) as image:
        image.load()
    assert stat.S_IMODE(output.stat().st_mode) == 0o644  # umask 022


def _jobs(faces_dir, out):
    return [(faces_dir / name, out / f"swap-{name}") for name in ("biden2.jpg", "obama1.jpg")]


def test_disk_full_at_the_final_jpeg_then_rerun(engine, identity, tmp_path, faces_dir, monkeypatch):
    out = tmp_path / "out"
    disk = DiskFull("swap-obama1")
    monkeypatch.setattr(files, "_fsync_file", disk)
    with pytest.raises(EnvironmentFault) as caught:
        run_jobs(engine, identity, ["obama.jpg"], _jobs(faces_dir, out), progress=False)
    line = error_line("swap", caught.value)
    assert disk.hits and line.startswith("appleswap swap: error: ")
    assert str(out / "swap-obama1.jpg") in line and "no space left on the device" in line and "\n" not in line
    assert sorted(p.name for p in out.iterdir()) == ["swap-biden2.jpg"]  # no truncated JPEG, no temporary file
    _assert_complete(out)

    monkeypatch.setattr(files, "_fsync_file", disk.real)  # space again: the same jobs finish
    results = run_jobs(engine, identity, ["obama.jpg"], _jobs(faces_dir, out), progress=False)
    assert [r["status"] for r in results] == ["ok", "ok"]
    assert sorted(p.name for p in out.iterdir()) == ["swap-biden2.jpg", "swap-obama1.jpg"]
    _assert_complete(out)


def test_read_only_output_folder_stops_with_the_path(engine, identity, tmp_path, faces_dir):
    with read_only(tmp_path / "locked") as locked:
        with pytest.raises(EnvironmentFault) as caught:
            run_jobs(engine, identity, ["obama.jpg"], _jobs(faces_dir, locked), progress=False)
        assert not any(locked.iterdir())
    line = error_line("swap", caught.value)
    assert str(locked / "swap-biden2.jpg") in line
    assert "read-only file system" in line or "permission denied" in line
