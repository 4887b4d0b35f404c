"""``appleswap generate`` on tiny weights: layouts, sharding, resume, grids, teacher inversion, CLI smoke."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest

from appleswap.files import load_image, save_image
from appleswap.generate import GenerateConfig, generate, pairs_from_csv, pairs_from_layout, shard_of
from appleswap.identity.store import save_identity
from tests.fixtures.tiny_flux import make_tiny_weights, one_thread, tiny_id_tokens  # noqa: F401

NAMES = ("000", "001", "002")


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("ffhq")
    rng = np.random.default_rng(0)
    for index, name in enumerate(NAMES):
        for folder in ("src", "trg", "trg/cond"):
            save_image(root / folder / f"{name}.png", (rng.random((64, 64, 3)) * 255).astype(np.uint8))
        save_identity(root / "ids" / f"{name}.safetensors", tiny_id_tokens(1, seed=index))
    return root


def _config(data, output, **kw):
    base = {"data": data, "output": output, "ids_dir": data / "ids", "num_steps": 2, "size": 64, "dtype": "fp32"}
    return GenerateConfig(**{**base, **kw})


def test_layout_and_csv_pairs(data, tmp_path):
    pairs = pairs_from_layout(data, "cond")
    assert [p.name for p in pairs] == list(NAMES) and pairs[0].condition == data / "trg/cond/000.png"
    csv_path = tmp_path / "pairs.csv"
    csv_path.write_text(f"source,target,condition\n{data}/src/000.png,{data}/trg/001.png,{data}/trg/cond/001.png\n")
    (pair,) = pairs_from_csv(csv_path)
    assert pair.name == "000_001" and pair.condition.name == "001.png"
    with pytest.raises(FileNotFoundError, match="condition"):
        pairs_from_layout(data, "nope")
    assert shard_of("1/3") == (1, 3)
    with pytest.raises(ValueError, match="shard"):
        shard_of("3/3")


def test_sharded_resumable_student_run(weights, data, tmp_path):
    out = tmp_path / "student"
    first = generate(_config(data, out, shard="0/2"), weights_dir=weights, device="cpu")
    second = generate(_config(data, out, shard="1/2", batch_size=2), weights_dir=weights, device="cpu")
    assert sorted(p.name for p in first) == ["000.png", "002.png"] and [p.name for p in second] == ["001.png"]
    assert load_image(out / "001.png").shape == (64, 64, 3)
    assert load_image(out / "grid" / "000_grid.png").shape == (64, 192, 3)
    # resume: everything done, nothing rewritten
    assert generate(_config(data, out), weights_dir=weights, device="cpu") == []
    # the batch of two gave the same result as a single run of that pair would (seed per image)
    single = generate(_config(data, tmp_path / "single", limit=2, shard="1/2"), weights_dir=weights, device="cpu")
    np.testing.assert_allclose(load_image(single[0]).astype(int), load_image(out / "001.png").astype(int), atol=2)


def test_teacher_with_inversion_needs_conditions(weights, data, tmp_path):
    with pytest.raises(ValueError, match="condition"):
        generate(_config(data, tmp_path / "t0", mode="teacher", limit=1), weights_dir=weights, device="cpu")
    written = generate(_config(data, tmp_path / "t", mode="teacher", condition_dir="cond", invert=True, limit=1),
                       weights_dir=weights, device="cpu")
    assert [p.name for p in written] == ["000.png"]


def test_cli_smoke(weights, data, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "appleswap.cli", "generate", "--weights-dir", str(weights), "--device", "cpu",
               "--data", str(data), "--ids-dir", str(data / "ids"), "--output", str(tmp_path / "cli"),
               "--steps", "1", "--size", "64", "--dtype", "fp32", "--limit", "1", "--no-grid"]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "cli" / "000.png").is_file() and (tmp_path / "cli" / "generate_config.json").is_file()
    from appleswap.app.verify_cli import verify_file

    verdict = verify_file(tmp_path / "cli" / "000.png")  # every output labelled, signed and watermarked
    assert verdict.provenance["model"] == "appleswap-student" and verdict.provenance["target"] == "000.png"
    assert verdict.provenance["watermark"]  # (a 64 px picture of the tiny model's noise is too small to find it)
    assert verdict.c2pa_valid and verdict.c2pa["actions"] == ["c2pa.opened", "c2pa.edited"]


def test_a_bad_pair_is_reported_and_the_rest_written(weights, data, tmp_path):
    import shutil

    copy = tmp_path / "data"
    shutil.copytree(data, copy)
    (copy / "trg" / "001.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    failures: list[str] = []
    written = generate(_config(copy, tmp_path / "out", grid=False), weights_dir=weights, device="cpu",
                       failures=failures)
    assert [p.name for p in written] == ["000.png", "002.png"]
    assert len(failures) == 1 and failures[0].startswith("001: ") and "not a readable image" in failures[0]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["000.png", "002.png"]
