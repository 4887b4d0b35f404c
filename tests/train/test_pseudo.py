"""`appleswap pseudo` on two ranks in batches of 2, killed and restarted: every pair exactly once; then a student
run on it."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.fixtures.tiny_flux import make_tiny_weights
from tests.train.conftest import write_dataset

REPO = Path(__file__).resolve().parents[2]
CHECKOUT = os.pathsep.join(str(REPO / p) for p in ("src", ""))  # this checkout's code, not an installed copy
CLI = ("import sys; from appleswap.cli_common import setup_logging; from appleswap.train import pseudo, cli; "
       "import argparse; p = argparse.ArgumentParser(); s = p.add_subparsers(); pseudo.add_parser(s); "
       "cli.add_parser(s); a = p.parse_args(sys.argv[1:]); setup_logging('warning'); sys.exit(a.func(a))")


@pytest.fixture(scope="module")
def base(tmp_path_factory, faces_dir) -> Path:
    """Tiny weights and a 4-identity dataset (the two real people, each also copied under a second name)."""
    root = tmp_path_factory.mktemp("pseudo")
    make_tiny_weights(root / "w")
    write_dataset(root / "data", root / "ids", faces_dir)
    for name in ("obama", "biden"):
        shutil.copytree(root / "data" / name, root / "data" / f"{name}_b")
        for kind in ("masked", "raw"):
            shutil.copytree(root / "ids" / kind / name, root / "ids" / kind / f"{name}_b")
    scores = json.loads((root / "data" / "score.json").read_text())
    scores.update({k.replace("/", "_b/", 1): v for k, v in scores.items()})
    (root / "data" / "score.json").write_text(json.dumps(scores))
    return root


def _launch(base: Path, out: Path, rank: int, steps: int = 3) -> subprocess.Popen:
    env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "OMP_NUM_THREADS": "1", "PYTHONPATH": CHECKOUT}
    args = ["pseudo", "--dataset-root", str(base / "data"), "--id-cache", str(base / "ids"), "-o", str(out),
            "--num-pairs", "6", "--steps", str(steps), "--batch-size", "2", "--no-score", "--dtype", "fp32",
            "--size", "64", "--weights-dir", str(base / "w"), "--device", "cpu"]
    return subprocess.Popen([sys.executable, "-c", CLI, *args], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while not predicate() and time.time() < deadline and proc.poll() is None:
        time.sleep(0.01)


def test_killed_and_restarted_generates_every_pair_once(base, tmp_path):
    out = tmp_path / "pseudo"
    first = [_launch(base, out, 0, steps=16), _launch(base, out, 1, steps=16)]
    _wait_for(lambda: (out / "pairs.json").is_file(), first[0])
    manifest = json.loads((out / "pairs.json").read_text())
    shard0 = [out / p["file"] for p in manifest["pairs"][0::2]]
    _wait_for(lambda: any(p.is_file() for p in shard0), first[0])
    first[0].send_signal(signal.SIGKILL)  # rank 0 dies in the middle of its shard
    first[0].wait(timeout=60)
    done = sum(p.is_file() for p in shard0)
    assert 1 <= done < len(shard0), done
    first[1].communicate(timeout=600)
    second = [_launch(base, out, 0, steps=16), _launch(base, out, 1, steps=16)]
    for proc in second:
        _, err = proc.communicate(timeout=600)
        assert proc.returncode == 0, err[-2000:]
    assert json.loads((out / "pairs.json").read_text()) == manifest  # the same pairs, drawn once
    expected = sorted(p["file"] for p in manifest["pairs"])
    assert sorted(p.name for p in out.glob("*.png")) == expected  # each pair exactly once, nothing else
    assert not list(out.glob(".*.tmp"))
    assert all(p["source"].split("/")[0] != p["target"].split("/")[0] for p in manifest["pairs"])


def test_student_trains_on_pseudo_triplets(base, tmp_path):
    out = tmp_path / "pseudo"
    proc = _launch(base, out, 0)
    proc.communicate(timeout=600)
    proc = _launch(base, out, 1)
    proc.communicate(timeout=600)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": CHECKOUT}
    run = tmp_path / "student"
    args = ["train", "student", "--dataset-root", str(base / "data"), "--id-cache", str(base / "ids"),
            "--pseudo-root", str(out), "-o", str(run), "--size", "64", "--lora-rank", "4",
            "--lora-alpha", "4", "--batch-size", "2", "--gradient-accumulation", "1", "--max-steps", "2",
            "--dtype", "fp32", "--id-loss", "none", "--lpips-weight", "0", "--num-validation", "1",
            "--save-every", "2", "--validate-every", "2", "--validation-steps", "2", "--workers", "0",
            "--proxy-recon-prob", "0.5", "--init-lora", str(base / "w" / "apple" / "teacher"),
            "--weights-dir", str(base / "w"), "--device", "cpu"]
    result = subprocess.run([sys.executable, "-c", CLI, *args], env=env, capture_output=True, text=True, timeout=600,
                            check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    from safetensors.torch import load_file

    student = load_file(str(run / "checkpoints" / "step0000002" / "default.safetensors"))
    teacher = load_file(str(base / "w" / "apple" / "teacher" / "default.safetensors"))
    assert student.keys() == teacher.keys()  # initialised from the teacher, same modules and rank
    gap = max((student[k].float() - teacher[k].float()).abs().max().item() for k in teacher)
    assert 0 < gap < 1e-3  # two AdamW steps at lr 1e-4 away from the teacher
    assert (run / "previews" / "step0000002.png").is_file()
