"""Faults of the environment, as a hostile machine produces them: a read-only output folder, a disk that fills up
mid-run, a read-only weights folder, ``kill -9`` of a multi-process run, a umask. Each test runs the CLI as a user
does and checks the message (one line, names the path and the cause, no traceback), the exit code and the files
(every file at a final path is complete; the item that hit the fault is retried by the next run).

Read-only folders: a read-only bind mount or tmpfs when running as root (permissions do not stop root), ``chmod``
otherwise. A full disk: an injected ENOSPC where the data reaches the disk (``fsync`` of the writer's file), and, when
this process may mount, a real 1-2 MiB tmpfs that fills up.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from appleswap import files
from appleswap.cli import main

REPO = Path(__file__).resolve().parents[1]
PHOTOS = ("obama1.jpg", "biden2.jpg", "obama3.jpg")


# ---------------------------------------------------------------- helpers


def _mount(*args: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    return subprocess.run(["mount", *args], check=False, capture_output=True).returncode == 0


def _umount(path: Path) -> None:
    subprocess.run(["umount", "-l", str(path)], check=False, capture_output=True)


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` made read-only for this process: a read-only bind mount as root, chmod a-w otherwise."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() == 0:
        if not (_mount("--bind", str(folder), str(folder)) and _mount("-o", "remount,ro,bind", str(folder))):
            _umount(folder)
            pytest.skip("running as root without mount rights: cannot make a folder read-only")
        try:
            yield folder
        finally:
            _umount(folder)
        return
    modes = {path: path.stat().st_mode for path in [folder, *folder.rglob("*")] if path.is_dir()}
    for path, mode in modes.items():
        path.chmod(stat.S_IMODE(mode) & ~0o222)
    try:
        yield folder
    finally:
        for path, mode in modes.items():
            path.chmod(stat.S_IMODE(mode))


def _inputs(tmp_path: Path, faces_dir: Path, names=PHOTOS) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir(exist_ok=True)
    for name in names:
        shutil.copy(faces_dir / name, folder / name)
    return folder


def _output_files(root: Path) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p.is_file())


def _assert_complete(root: Path, killed: bool = False) -> None:
    """Every image at a final name decodes to its last pixel, every JSON parses, and no temporary file is left
    (after ``kill -9`` one may be: the next run removes it)."""
    leftovers = [p for p in _output_files(root) if p.name.endswith(".tmp")]
    assert killed or not leftovers, leftovers
    for path in _output_files(root):
        if path in leftovers:
            continue
        if path.suffix in (".jpg", ".png"):
            with Image.open(path) as image:
                image.load()  # raises on a truncated file
        elif path.suffix == ".json":
            json.loads(path.read_text())


def _one_line_error(err: str, *needles: str) -> str:
    lines = [line for line in err.splitlines() if "error" in line]
    assert "Traceback" not in err, err
    assert len(lines) == 1, err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _preprocess(src: Path, out: Path, *extra: str) -> int:
    return main(["preprocess", str(src), str(out), "--no-progress", "--log-level", "error", *extra])


def _records(out: Path) -> dict[str, dict]:
    return {p.stem: json.loads(p.read_text()) for p in (out / "manifest").glob("*.json")}


class DiskFull:
    """Inject ENOSPC where a writer's data reaches the disk (``fsync``) for files whose name contains ``match``."""

    def __init__(self, match: str) -> None:
        self.match, self.hits = match, []
        self.real = files._fsync_file

    def __call__(self, path: Path) -> None:
        if self.match in Path(path).name:
            self.hits.append(Path(path))
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        self.real(path)


# ---------------------------------------------------------------- preprocess


def test_unwritable_output_folder_is_one_line_exit_2(tmp_path, faces_dir, capsys):
    src = _inputs(tmp_path, faces_dir, PHOTOS[:1])
    with read_only(tmp_path / "locked") as locked:
        code = _preprocess(src, locked / "dataset")
    err = capsys.readouterr().err
    assert code == 2
    line = _one_line_error(err, str(locked / "dataset"))
    assert "read-only file system" in line or "permission denied" in line
    assert "run the same command again" in line


def test_disk_full_mid_run_then_rerun_with_space(tmp_path, faces_dir, capsys, monkeypatch):
    """ENOSPC on the last photo's aligned crop: exit 2 naming the file and the cause, the other photos' outputs
    complete, no record for the last one (it is not a per-file error), and the rerun finishes it."""
    src, out = _inputs(tmp_path, faces_dir), tmp_path / "dataset"
    disk = DiskFull("obama3")
    monkeypatch.setattr(files, "_fsync_file", disk)
    assert _preprocess(src, out) == 2
    line = _one_line_error(capsys.readouterr().err, "no space left on the device", "free some space")
    assert disk.hits and str(out / "obama3.jpg") in line
    assert not (out / "obama3.jpg").exists()  # no partial file at the final path
    _assert_complete(out)
    assert "obama3" not in _records(out)  # retried next time, not recorded as a bad input
    assert {name: r["status"] for name, r in _records(out).items()} == {"biden2": "ok", "obama1": "ok"}

    monkeypatch.setattr(files, "_fsync_file", disk.real)  # space again
    assert _preprocess(src, out) == 0
    records = _records(out)
    assert sorted(records) == ["biden2", "obama1", "obama3"] and {r["status"] for r in records.values()} == {"ok"}
    _assert_complete(out)
    assert capsys.readouterr().err.count("error") == 0


def test_real_small_tmpfs_fills_up_then_rerun(tmp_path, faces_dir, capsys):
    """The same on a real file system that runs out of space (an 800 KiB tmpfs; the three photos need ~1.3 MiB),
    grown for the rerun."""
    mount_point = tmp_path / "small"
    mount_point.mkdir()
    if not _mount("-t", "tmpfs", "-o", "size=800k", "tmpfs", str(mount_point)):
        pytest.skip("cannot mount a tmpfs here (needs root)")
    try:
        src, out = _inputs(tmp_path, faces_dir), mount_point / "dataset"
        assert _preprocess(src, out) == 2
        _one_line_error(capsys.readouterr().err, "no space left on the device", str(out))
        _assert_complete(out)
        finished = _records(out)
        assert all(record["status"] == "ok" for record in finished.values()) and len(finished) < len(PHOTOS)
        assert _mount("-o", "remount,size=64m", str(mount_point))
        assert _preprocess(src, out) == 0
        assert {r["status"] for r in _records(out).values()} == {"ok"} and len(_records(out)) == len(PHOTOS)
        _assert_complete(out)
    finally:
        _umount(mount_point)


def test_some_bad_inputs_exit_1_all_bad_exit_2(tmp_path, faces_dir, capsys):
    src = _inputs(tmp_path, faces_dir, PHOTOS[:1])
    Image.fromarray(np.full((200, 200, 3), 128, np.uint8)).save(src / "wall.png")  # no face
    assert _preprocess(src, tmp_path / "mixed") == 1
    printed = capsys.readouterr().out
    assert "FAILED:" in printed and "wall.png" in printed and "1 input(s) failed" in printed
    assert _preprocess(src, tmp_path / "mixed") == 1  # the bad input is recorded, not retried: same answer
    walls = tmp_path / "walls"
    walls.mkdir()
    shutil.move(src / "wall.png", walls / "wall.png")
    assert _preprocess(walls, tmp_path / "none") == 2


def _descendants(pid: int) -> set[int]:
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError, IndexError, ValueError):
                parent = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
                children.setdefault(parent, []).append(int(entry.name))
    found, todo = set(), [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.add(child)
            todo.append(child)
    return found


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state not in ("Z", "X")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_sigkill_of_preprocess_with_workers_leaves_no_orphans_and_resumes(tmp_path, faces_dir):
    src, out = _inputs(tmp_path, faces_dir), tmp_path / "dataset"
    for index in range(3):  # enough work to still be running when killed
        shutil.copy(faces_dir / "obama2.jpg", src / f"copy{index}.jpg")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src") + os.pathsep + os.environ.get("PYTHONPATH", "")}
    command = [sys.executable, "-m", "appleswap.cli", "preprocess", str(src), str(out), "--workers", "2",
               "--no-progress", "--log-level", "error"]
    parent = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: set[int] = set()
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and parent.poll() is None:
            workers |= _descendants(parent.pid)
            if len(workers) >= 2 and (out / "manifest").is_dir() and any((out / "manifest").glob("*.json")):
                break
            time.sleep(0.2)
        assert parent.poll() is None, "the run finished before it could be killed"
        workers |= _descendants(parent.pid)
        assert len(workers) >= 2
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and any(_alive(pid) for pid in workers):
            time.sleep(0.2)
        orphans = [pid for pid in workers if _alive(pid)]
        assert not orphans, f"worker processes outlived their parent: {orphans}"
    finally:
        if parent.poll() is None:
            parent.kill()
        for pid in workers:
            with contextlib.suppress(OSError):
                if _alive(pid):
                    os.kill(pid, signal.SIGKILL)
    _assert_complete(out, killed=True)
    assert _preprocess(src, out) == 0
    assert len(_records(out)) == len(PHOTOS) + 3 and {r["status"] for r in _records(out).values()} == {"ok"}
    _assert_complete(out)


@pytest.mark.parametrize(("umask", "expected"), [(0o022, 0o644), (0o027, 0o640)])
def test_outputs_honour_the_umask(tmp_path, faces_dir, umask, expected):
    src, out = _inputs(tmp_path, faces_dir, PHOTOS[:1]), tmp_path / "dataset"
    previous = os.umask(umask)
    try:
        assert _preprocess(src, out) == 0
    finally:
        os.umask(previous)
    written = _output_files(out)
    assert len(written) >= 8  # crop, drawings, masks, condition, record, manifest
    modes = {path.relative_to(out).as_posix(): oct(stat.S_IMODE(path.stat().st_mode)) for path in written}
    assert set(modes.values()) == {oct(expected)}, modes


def test_unexpected_error_is_one_line_and_debug_shows_the_traceback(tmp_path, faces_dir, capsys, monkeypatch):
    from appleswap.preprocess import runner

    def broken(*args, **kwargs):
        raise TypeError("planted bug")

    monkeypatch.setattr(runner, "run_preprocess", broken)
    src = _inputs(tmp_path, faces_dir, PHOTOS[:1])
    assert _preprocess(src, tmp_path / "o") == 2
    _one_line_error(capsys.readouterr().err, "internal error: TypeError: planted bug", "--log-level debug")
    assert main(["preprocess", str(src), str(tmp_path / "o"), "--log-level", "debug", "--no-progress"]) == 2
    assert "Traceback" in capsys.readouterr().err


def test_what_counts_as_a_fault_of_the_environment(tmp_path):
    """The classification every command relies on: machine faults (by errno or device message) vs bad inputs/bugs."""
    full = files.environment_fault(OSError(errno.ENOSPC, "No space left on device", "/data/x.png"))
    assert full is not None and str(full).startswith("/data/x.png: no space left on the device")
    wrapped = RuntimeError("save failed")
    wrapped.__cause__ = PermissionError(errno.EACCES, "Permission denied", "/out")
    assert "permission denied" in str(files.environment_fault(wrapped))
    assert "read-only" in str(files.environment_fault(OSError(errno.EROFS, "x"), path="/w/cache.bin"))
    assert "/w/cache.bin" in str(files.environment_fault(OSError(errno.EROFS, "x"), path="/w/cache.bin"))
    assert files.environment_fault(RuntimeError("CUDA out of memory. Tried to allocate 2 GiB")) is not None
    assert files.environment_fault(AssertionError("Torch not compiled with CUDA enabled")) is not None
    unreadable = files.ImageLoadError("a.jpg: not a readable image")
    unreadable.__cause__ = PermissionError(errno.EACCES, "Permission denied", "a.jpg")
    for bad_input_or_bug in (unreadable, ValueError("no face"), FileNotFoundError(errno.ENOENT, "gone", "x"),
                             KeyError("k"), TypeError("bug")):
        assert files.environment_fault(bad_input_or_bug) is None, bad_input_or_bug
    fault = files.environment_fault(OSError(errno.ENOSPC, "No space left on device", "/d/f"))
    from multiprocessing.reduction import ForkingPickler  # what the worker pool sends results and errors with

    assert str(ForkingPickler.loads(ForkingPickler.dumps(fault))) == str(fault)  # crosses the pool unchanged
