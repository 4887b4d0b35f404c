"""``appleswap weights download`` against a local fake hub: licences shown first and non-commercial ones asked
for, SHA-256 checked before a file is put in place, folders fetched by pattern. Nothing reaches the network."""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

import huggingface_hub
import pytest

from appleswap import weights
from appleswap.cli import main
from appleswap.weights import LicenceNotAccepted, WeightSpec, download


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """A fake Hugging Face hub: ``<hub>/<repo>/<file>``, served by stand-ins of hf_hub_download and
    snapshot_download that copy into ``local_dir`` as the real ones do; every call is recorded."""
    root = tmp_path / "hub"
    calls: list[tuple] = []

    def hf_hub_download(repo_id, filename, *, repo_type="model", revision=None, local_dir=None):
        calls.append(("file", repo_id, filename))
        source = root / repo_id / filename
        if not source.is_file():
            raise huggingface_hub.errors.EntryNotFoundError(f"{filename} not in {repo_id}")
        target = Path(local_dir) / filename
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(source, target)
        return str(target)

    def snapshot_download(repo_id, *, allow_patterns=None, repo_type="model", revision=None, local_dir=None):
        calls.append(("snapshot", repo_id, tuple(allow_patterns or ())))
        for source in (root / repo_id).rglob("*"):
            rel = source.relative_to(root / repo_id).as_posix()
            if source.is_file() and (not allow_patterns or any(Path(rel).match(p) for p in allow_patterns)):
                (Path(local_dir) / rel).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy(source, Path(local_dir) / rel)
        return str(local_dir)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    return root, calls


def publish(hub_root: Path, repo: str, name: str, data: bytes) -> str:
    path = hub_root / repo / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def registry(hub, monkeypatch):
    """Three entries: an Apache file with its SHA-256, a non-commercial folder, and a manual-only file."""
    root, _ = hub
    digest = publish(root, "org/ids", "ids_v1.safetensors", b"identity weights")
    publish(root, "org/detector", "det.onnx", b"detector")
    publish(root, "org/detector", "rec.onnx", b"recogniser")
    publish(root, "org/detector", "huge_unused.bin", b"not wanted")
    specs = {
        "ids": WeightSpec("ids", "ID model", "ids/ids_v1.safetensors", "Apache-2.0", "org/ids", sha256=digest,
                          hf_repo="org/ids", hf_files=("ids_v1.safetensors",)),
        "detector": WeightSpec("detector", "detector pack", "pack", "insightface models: non-commercial research only",
                               "org/detector", kind="dir", contains=("det.onnx", "rec.onnx"),
                               hf_repo="org/detector", hf_files=("det.onnx", "rec.onnx")),
        "manual": WeightSpec("manual", "by hand", "m/m.pth", "MIT", "a Google Drive link"),
    }
    monkeypatch.setattr(weights, "load_registry", lambda: specs)
    return specs


def test_licences_are_shown_first_and_a_refusal_downloads_nothing(tmp_path, hub, registry):
    _, calls = hub
    lines, questions = [], []

    def refuse(question):
        questions.append(question)
        return "n"

    with pytest.raises(LicenceNotAccepted):
        download([], tmp_path / "w", ask=refuse, say=lines.append)
    assert calls == [] and not (tmp_path / "w" / "pack").exists()
    assert len(questions) == 1 and "detector" in questions[0] and "ids" not in questions[0]
    text = "\n".join(lines)
    assert "non-commercial research only" in text and "Apache-2.0" in text


def test_accepted_download_installs_verified_files(tmp_path, hub, registry):
    _, calls = hub
    lines: list[str] = []
    written = download([], tmp_path / "w", ask=lambda q: "y", say=lines.append)
    assert (tmp_path / "w" / "ids" / "ids_v1.safetensors").read_bytes() == b"identity weights"
    assert sorted(p.name for p in (tmp_path / "w" / "pack").iterdir()) == ["det.onnx", "rec.onnx"]
    assert sorted(map(str, written)) == sorted([str(tmp_path / "w" / "ids" / "ids_v1.safetensors"),
                                               str(tmp_path / "w" / "pack")])
    assert not (tmp_path / "w" / ".download").exists() or not any((tmp_path / "w" / ".download").iterdir())
    licence_line = next(i for i, line in enumerate(lines) if "non-commercial research only" in line)
    first_download = next(i for i, line in enumerate(lines) if line.startswith("downloading"))
    assert licence_line < first_download
    # present now: a second run fetches nothing
    calls.clear()
    assert download([], tmp_path / "w", ask=lambda q: pytest.fail("asked again"), say=lines.append) == []
    assert calls == []


def test_checksum_mismatch_is_not_installed(tmp_path, hub, registry):
    root, _ = hub
    publish(root, "org/ids", "ids_v1.safetensors", b"tampered weights")
    with pytest.raises(ValueError, match="SHA-256"):
        download(["ids"], tmp_path / "w", say=lambda line: None)
    assert not (tmp_path / "w" / "ids" / "ids_v1.safetensors").exists()


def test_manual_entries_name_their_source(tmp_path, hub, registry):
    lines: list[str] = []
    assert download(["manual"], tmp_path / "w", say=lines.append) == []
    assert any("Google Drive" in line for line in lines)
    with pytest.raises(ValueError, match="unknown weight"):
        download(["nope"], tmp_path / "w", say=lines.append)


def test_cli_needs_acceptance_off_a_terminal(tmp_path, hub, registry, capsys, monkeypatch):
    monkeypatch.setattr("sys.stdin.isatty", lambda: False)
    assert main(["weights", "download", "detector", "--weights-dir", str(tmp_path / "w")]) == 2
    assert "--accept-licence" in capsys.readouterr().err
    assert not (tmp_path / "w" / "pack").exists()
    assert main(["weights", "download", "detector", "--weights-dir", str(tmp_path / "w"), "--yes"]) == 0
    assert (tmp_path / "w" / "pack" / "rec.onnx").is_file()
    assert main(["weights", "check", "--weights-dir", str(tmp_path / "w")]) == 0
    assert "detector" in capsys.readouterr().out


def test_registry_hints_name_hf_download():
    """The pinned huggingface_hub installs `hf`, not `huggingface-cli`."""
    text = " ".join(spec.source for spec in weights.load_registry().values())
    assert "huggingface-cli" not in text and "hf download" in text
    assert all(spec.hf_files for spec in weights.load_registry().values() if spec.hf_repo)
