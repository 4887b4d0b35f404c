"""prepare-ids: layout, .npy import, resume after SIGKILL, sharding; the identity command."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from appleswap.files import save_image
from appleswap.identity.cli import main
from appleswap.identity.prepare import list_dataset, resolve_shard, run_prepare_ids
from appleswap.identity.store import load_identity

REPO = Path(__file__).resolve().parents[2]


def _dataset(root: Path, photos: dict, copies: int = 2) -> Path:
    """Identity tree: n000001 = Obama photos, n000002 = Biden; one mask_intersection PNG."""
    for i in range(copies):
        save_image(root / "n000001" / f"000{i}_01.jpg", photos["obama.jpg" if i % 2 == 0 else "obama1.jpg"])
        save_image(root / "n000002" / f"000{i}_01.jpg", photos["biden2.jpg"])
    image = photos["biden2.jpg"]
    mask = np.zeros(image.shape[:2], np.uint8)
    mask[image.shape[0] // 4: 3 * image.shape[0] // 4, image.shape[1] // 4: 3 * image.shape[1] // 4] = 255
    save_image(root / "n000002" / "mask_intersection" / "0000_01.png", mask)
    return root


def _files(cache: Path) -> list[str]:
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*") if p.is_file())


def _cli(dataset: Path, cache: Path, weights: Path, *extra: str) -> list[str]:
    return ["prepare-ids", str(dataset), "-o", str(cache), "--weights-dir", str(weights), "--device", "cpu",
            "--no-progress", "--log-level", "error", *extra]


def test_prepare_layout_and_npy_import(tmp_path, tiny_weights, photos):
    ds = _dataset(tmp_path / "ds", photos, copies=1)
    ref = torch.randn(1, 32, 64)
    (ds / "n000001" / "pulid_id").mkdir()
    np.save(ds / "n000001" / "pulid_id" / "0000_01.npy", ref.numpy())
    np.save(ds / "n000001" / "pulid_id" / "uncond.npy", ref.numpy()[0] * 0 + 1)
    assert [e.rel for e in list_dataset(ds)] == ["n000001/0000_01", "n000002/0000_01"]
    assert main(_cli(ds, tmp_path / "cache", tiny_weights)) == 0
    cache = tmp_path / "cache"
    assert _files(cache) == ["masked/n000001/0000_01.safetensors", "masked/n000002/0000_01.safetensors",
                             "null.safetensors", "raw/n000001/0000_01.safetensors", "raw/n000002/0000_01.safetensors"]
    imported, meta = load_identity(cache / "raw" / "n000001" / "0000_01.safetensors")
    torch.testing.assert_close(imported, ref)
    assert meta["imported_from"] == "pulid_id/0000_01.npy"
    null, _ = load_identity(cache / "null.safetensors")
    assert torch.all(null == 1)  # the dataset's uncond.npy wins over recomputation
    _, meta = load_identity(cache / "masked" / "n000002" / "0000_01.safetensors")
    assert meta["face_mask"] == "mask_intersection/0000_01.png" and meta["masked"] == "true"
    _, meta = load_identity(cache / "masked" / "n000001" / "0000_01.safetensors")
    assert meta["face_mask"] == "computed" and "model.pulid" in meta
    with pytest.raises(ValueError, match="inside the dataset"):
        run_prepare_ids(ds, ds / "ids", lambda: None)


def test_prepare_resumes_after_sigkill(tmp_path, tiny_weights, photos, encoder):
    from appleswap.files import load_image

    ds = _dataset(tmp_path / "ds", photos, copies=3)
    cache = tmp_path / "cache"
    cmd = _cli(ds, cache, tiny_weights, "--kinds", "raw")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "appleswap.identity.cli", *cmd], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 90
    while time.time() < deadline and not list(cache.rglob("*.safetensors")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = [f for f in _files(cache) if f.endswith(".safetensors")]
    assert 0 < len(done_before) < 7, "the kill should land mid-run"
    stamps = {f: (cache / f).stat().st_mtime_ns for f in done_before}
    assert main(cmd) == 0
    names = _files(cache)  # every file exactly once, no temporary leftovers
    assert names == ["null.safetensors"] + [f"raw/{i}/000{k}_01.safetensors" for i in ("n000001", "n000002")
                                            for k in range(3)]
    assert all((cache / f).stat().st_mtime_ns == stamps[f] for f in done_before)  # finished files not redone
    for entry in list_dataset(ds):
        want = encoder.encode([load_image(entry.image)])
        torch.testing.assert_close(load_identity(cache / "raw" / f"{entry.rel}.safetensors")[0], want,
                                   atol=1e-5, rtol=1e-5)


def test_sharding_splits_work(tmp_path, tiny_weights, photos, monkeypatch):
    ds = _dataset(tmp_path / "ds", photos, copies=1)
    cache = tmp_path / "cache"
    assert main(_cli(ds, cache, tiny_weights, "--shard-index", "1", "--num-shards", "2", "--kinds", "raw")) == 0
    assert _files(cache) == ["raw/n000002/0000_01.safetensors"]  # shard 1 of 2; null only from shard 0
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert resolve_shard(None, None) == (0, 2)
    with pytest.raises(ValueError, match="shard-index"):
        resolve_shard(2, 2)


def test_failures_are_reported_and_retried(tmp_path, tiny_weights, photos):
    ds = _dataset(tmp_path / "ds", photos, copies=1)
    save_image(ds / "n000002" / "0001_01.jpg", np.full((128, 128, 3), 90, np.uint8))
    stats = run_prepare_ids(ds, tmp_path / "cache", lambda: _encoder(tiny_weights), kinds=("raw",), progress=False)
    assert stats.written == 2 and len(stats.failed) == 1 and "0001_01.jpg: no face" in stats.failed[0]
    assert not (tmp_path / "cache" / "raw" / "n000002" / "0001_01.safetensors").exists()
    assert "0001_01.jpg" in (tmp_path / "cache" / "failures.shard0-of-1.json").read_text()


def test_flat_layout_listing(tmp_path, photos):
    save_image(tmp_path / "b.jpg", photos["obama.jpg"])
    save_image(tmp_path / "a.png", photos["biden2.jpg"])
    save_image(tmp_path / "mask_intersection" / "a.png", np.zeros((8, 8), np.uint8))
    entries = list_dataset(tmp_path)
    assert [e.rel for e in entries] == ["a", "b"]
    assert entries[0].mask_path() == tmp_path / "mask_intersection" / "a.png"
    assert entries[1].reference_npy("masked") == tmp_path / "masked_pulid_id" / "b.npy"
    with pytest.raises(FileNotFoundError, match="nowhere"):
        list_dataset(tmp_path / "nowhere")


def _encoder(weights):
    from appleswap.identity.encoder import IdentityEncoder

    return IdentityEncoder.from_pretrained(weights, device="cpu")


def test_identity_command(tmp_path, tiny_weights, photos, faces_dir, encoder):
    save_image(tmp_path / "a.jpg", photos["obama.jpg"])
    save_image(tmp_path / "b.jpg", photos["obama1.jpg"])
    out = tmp_path / "obama.safetensors"
    args = ["identity", "-s", str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg"), "-o", str(out),
            "--weights-dir", str(tiny_weights), "--device", "cpu", "--log-level", "error"]
    assert main(args) == 0
    tokens, meta = load_identity(out)
    assert tokens.shape == (1, 32, 64) and meta["sources"] == '["a.jpg", "b.jpg"]' and meta["masked"] == "false"
    from appleswap.files import load_image

    want = encoder.encode_identity([load_image(tmp_path / "a.jpg"), load_image(tmp_path / "b.jpg")])
    torch.testing.assert_close(tokens, want, atol=1e-5, rtol=1e-5)


def test_config_file_section_and_flag_precedence(tmp_path, tiny_weights, photos):
    ds = tmp_path / "ds"
    save_image(ds / "n000001" / "0000_01.jpg", photos["obama.jpg"])
    config = tmp_path / "ids.toml"
    config.write_text('[prepare_ids]\nkinds = ["masked"]\ndet_size = 320\n[other_stage]\nsteps = 3\n')
    cache = tmp_path / "cache"
    assert main(_cli(ds, cache, tiny_weights, "--config", str(config), "--kinds", "raw")) == 0
    assert _files(cache) == ["null.safetensors", "raw/n000001/0000_01.safetensors"]  # the flag beats the file
    config.write_text('[prepare_ids]\nkinds = ["mixed"]\n')
    assert main(_cli(ds, cache, tiny_weights, "--config", str(config))) == 2  # unknown kind: clear error


def test_preprocessed_dataset_is_listed_from_its_manifest_not_its_files(tmp_path, photos):
    """`preprocess --preview` writes preview.jpg (a contact sheet) beside the faces: never an identity photo."""
    import json

    ds = tmp_path / "ds"
    save_image(ds / "alice.jpg", photos["obama.jpg"])
    save_image(ds / "group_1.jpg", photos["biden2.jpg"])
    save_image(ds / "group_0.jpg", photos["obama1.jpg"])
    save_image(ds / "preview.jpg", photos["biden2.jpg"])
    save_image(ds / "stray.jpg", photos["biden2.jpg"])  # not in the manifest: a file the user dropped there
    face = {"status": "ok", "outputs": [], "key": ""}
    records = [
        {"key": "alice", "status": "ok", "faces": [{**face, "outputs": ["alice.jpg", "mask/alice.png"]}]},
        {"key": "group", "status": "ok", "faces": [{**face, "outputs": ["group_0.jpg"]},
                                                   {**face, "outputs": ["group_1.jpg"]}]},
        {"key": "broken", "status": "error", "error": "not an image", "faces": []},
    ]
    (ds / "manifest.json").write_text(json.dumps({"config": {}, "records": records}))
    assert [e.rel for e in list_dataset(ds)] == ["alice", "group_0", "group_1"]
    # a run still going (or killed) has only the per-input records
    (ds / "manifest.json").unlink()
    for record in records:
        save_image(ds / "manifest" / "unused.png", np.zeros((4, 4), np.uint8))
        (ds / "manifest" / f"{record['key']}.json").write_text(json.dumps(record))
    assert [e.rel for e in list_dataset(ds)] == ["alice", "group_0", "group_1"]
    # no manifest at all (the authors' layout): the files, reserved names left out
    import shutil

    shutil.rmtree(ds / "manifest")
    assert [e.rel for e in list_dataset(ds)] == ["alice", "group_0", "group_1", "stray"]
