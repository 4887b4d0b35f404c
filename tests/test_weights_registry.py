"""The weights registry's lookups on real folders: multi-file entries must be complete, the folder/env/explicit
precedence, the per-entry status rows and checksums (expectations written out by hand, not read from the code)."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from appleswap import weights

ANTELOPE_FILES = ("scrfd_10g_bnkps.onnx", "glintr100.onnx")  # what the identity stage opens


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch, tmp_path):
    for name in list(weights.load_registry()):
        monkeypatch.delenv(f"APPLESWAP_WEIGHT_{name.upper()}", raising=False)
    monkeypatch.delenv("APPLESWAP_HOME", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))


def _antelope(root: Path, files=ANTELOPE_FILES) -> Path:
    folder = root / "antelopev2"
    folder.mkdir(parents=True, exist_ok=True)
    for name in files:
        (folder / name).write_bytes(b"onnx")
    return folder


def test_complete_multi_file_folder_is_found(tmp_path):
    _antelope(tmp_path)
    assert weights.locate("antelopev2", tmp_path) == tmp_path / "antelopev2"


@pytest.mark.parametrize("absent", ANTELOPE_FILES)
def test_half_downloaded_multi_file_folder_is_refused(tmp_path, absent):
    _antelope(tmp_path, [f for f in ANTELOPE_FILES if f != absent])
    with pytest.raises(weights.MissingWeightError) as info:
        weights.locate("antelopev2", tmp_path)
    message = str(info.value)
    assert str(tmp_path / "antelopev2" / absent) in message  # the full path of what is missing
    present = next(f for f in ANTELOPE_FILES if f != absent)
    assert str(tmp_path / "antelopev2" / present) not in message  # only what is missing is named


def test_missing_folder_and_file_in_place_of_folder_are_refused(tmp_path):
    with pytest.raises(weights.MissingWeightError) as info:
        weights.locate("antelopev2", tmp_path)
    assert f"{tmp_path / 'antelopev2'}/ not found" in str(info.value)
    (tmp_path / "antelopev2").write_bytes(b"not a folder")
    with pytest.raises(weights.MissingWeightError):
        weights.locate("antelopev2", tmp_path)


def test_folder_in_place_of_a_file_is_refused(tmp_path):
    (tmp_path / "pulid" / "pulid_flux_v0.9.1.safetensors").mkdir(parents=True)
    with pytest.raises(weights.MissingWeightError) as info:
        weights.locate("pulid_flux", tmp_path)
    assert f"{tmp_path / 'pulid' / 'pulid_flux_v0.9.1.safetensors'} not found" in str(info.value)


def test_precedence_explicit_then_env_then_home_then_cache(tmp_path, monkeypatch):
    relative = Path("pulid") / "pulid_flux_v0.9.1.safetensors"
    for root in ("flag", "home", "xdg/appleswap"):
        (tmp_path / root / relative).parent.mkdir(parents=True)
        (tmp_path / root / relative).write_bytes(root.encode())
    assert weights.locate("pulid_flux") == tmp_path / "xdg" / "appleswap" / relative  # $XDG_CACHE_HOME/appleswap
    monkeypatch.setenv("APPLESWAP_HOME", str(tmp_path / "home"))
    assert weights.locate("pulid_flux") == tmp_path / "home" / relative
    assert weights.locate("pulid_flux", tmp_path / "flag") == tmp_path / "flag" / relative  # --weights-dir wins
    single = tmp_path / "single.safetensors"
    single.write_bytes(b"s")
    monkeypatch.setenv("APPLESWAP_WEIGHT_PULID_FLUX", str(single))
    assert weights.locate("pulid_flux", tmp_path / "flag") == single  # the per-weight override wins
    explicit = tmp_path / "explicit.safetensors"
    explicit.write_bytes(b"e")
    assert weights.locate("pulid_flux", tmp_path / "flag", explicit=explicit) == explicit  # a flag on the file
    with pytest.raises(weights.MissingWeightError):
        weights.locate("pulid_flux", explicit=tmp_path / "nowhere.safetensors")


def test_home_folder_default_without_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert weights.weights_dir() == tmp_path / "user" / ".cache" / "appleswap"
    assert weights.weights_dir("~/w") == tmp_path / "user" / "w"


def test_unknown_weight_names_the_known_ones():
    with pytest.raises(KeyError, match="pulid_flux"):
        weights.locate("no_such_weight")


def test_check_rows_and_checksums(tmp_path, monkeypatch):
    _antelope(tmp_path, ANTELOPE_FILES[:1])  # incomplete
    data = b"pulid weights"
    target = tmp_path / "pulid" / "pulid_flux_v0.9.1.safetensors"
    target.parent.mkdir()
    target.write_bytes(data)
    rows = {row["name"]: row for row in weights.check(tmp_path)}
    assert set(rows) == set(weights.load_registry())
    assert rows["antelopev2"]["status"] == "missing" and rows["pulid_flux"]["status"] == "present"
    assert rows["pulid_flux"]["path"] == str(target)
    spec = weights.get_spec("pulid_flux")
    assert {k: rows["pulid_flux"][k] for k in ("role", "licence", "source")} == \
        {"role": spec.role, "licence": spec.licence, "source": spec.source}
    good = hashlib.sha256(data).hexdigest()
    import dataclasses

    registry = dict(weights.load_registry())
    monkeypatch.setattr(weights, "load_registry", lambda: registry)
    registry["pulid_flux"] = dataclasses.replace(spec, sha256=good)
    assert {r["name"]: r["status"] for r in weights.check(tmp_path, verify=True)}["pulid_flux"] == "present, sha256 ok"
    assert {r["name"]: r["status"] for r in weights.check(tmp_path)}["pulid_flux"] == "present"  # no verify: no hash
    registry["pulid_flux"] = dataclasses.replace(spec, sha256="0" * 64)
    assert {r["name"]: r["status"] for r in weights.check(tmp_path, verify=True)}["pulid_flux"] == "BAD CHECKSUM"


def test_sha256_reads_the_whole_file_in_chunks(tmp_path):
    data = bytes(range(256)) * 1000
    (tmp_path / "f").write_bytes(data)
    assert weights.sha256_of(tmp_path / "f", chunk=1000) == hashlib.sha256(data).hexdigest()
    assert weights.sha256_of(tmp_path / "f") == hashlib.sha256(data).hexdigest()
