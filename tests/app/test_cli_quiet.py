"""A quiet command line (issue 25): no MediaPipe / TensorFlow Lite / absl / protobuf lines on stderr, nothing at
info level by default, and the per-step progress bar when asked. Run as a user runs it: a fresh process."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from tests.fixtures.tiny_flux import TINY_IMAGE_SIZE

REPO = Path(__file__).resolve().parents[2]
# what the libraries printed before: protobuf's GetPrototype error, absl's C++ log lines and its pre-init notice,
# TFLite's delegate line, transformers' weight-loading bar
NOISE = re.compile(r"GetPrototype|^[IWEF]\d{4} |absl::InitializeLog|XNNPACK|TensorFlow Lite|Loading weights|^INFO ",
                   re.MULTILINE)


def _run(*args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "appleswap.cli", *args], env=env, capture_output=True, text=True,
                          timeout=timeout, check=False)


def test_preprocess_prints_no_library_noise(tmp_path, faces_dir):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "obama.jpg").write_bytes((faces_dir / "obama.jpg").read_bytes())
    result = _run("preprocess", str(photos), str(tmp_path / "out"))
    assert result.returncode == 0, result.stderr
    assert '"faces": 1' in result.stdout
    assert not NOISE.findall(result.stderr), result.stderr


def test_swap_prints_no_library_noise_and_a_step_bar_when_asked(tmp_path, faces_dir, app_weights):
    result = _run("swap", "-s", str(faces_dir / "obama.jpg"), "-t", str(faces_dir / "biden2.jpg"), "-o",
                  str(tmp_path / "out.jpg"), "--weights-dir", str(app_weights), "--device", "cpu", "--size",
                  str(TINY_IMAGE_SIZE), "--steps", "2", "--progress")
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "out.jpg").is_file()
    assert not NOISE.findall(result.stderr), result.stderr
    assert re.search(r"sampling: +\d+%.*\| \d/2 \[", result.stderr)  # the per-step bar (stderr: no terminal)
    # not asked, and stderr not a terminal: no bar at all
    quiet = _run("swap", "-s", str(faces_dir / "obama.jpg"), "-t", str(faces_dir / "biden2.jpg"), "-o",
                 str(tmp_path / "out2.jpg"), "--weights-dir", str(app_weights), "--device", "cpu", "--size",
                 str(TINY_IMAGE_SIZE), "--steps", "1")
    assert quiet.returncode == 0 and "sampling" not in quiet.stderr, quiet.stderr
