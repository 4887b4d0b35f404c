"""The package foundation: image loading edge cases, atomic writes, configs as data, the weights registry, CLI."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
from PIL import Image

from appleswap import files, weights
from appleswap.config import add_config_args, load_config_file, option, resolve_config


def test_load_real_photo_and_rgba(faces_dir):
    rgb = files.load_image(faces_dir / "obama2.jpg")
    rgba = files.load_image(faces_dir / "obama2_rgba.png")
    assert rgb.dtype == np.uint8 and rgb.shape == (1200, 626, 3)
    with Image.open(faces_dir / "obama2_rgba.png") as image:  # an opaque RGBA file: its colour, alpha dropped
        np.testing.assert_array_equal(rgba, np.asarray(image)[..., :3])
    # partial alpha, 16-bit, CMYK and EXIF orientation against formulas: tests/test_image_decoding.py


def test_exif_rotation_is_applied(tmp_path, faces_dir):
    image = Image.open(faces_dir / "obama1.jpg")
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 CW on display
    image.save(tmp_path / "rot.jpg", exif=exif)
    loaded = files.load_image(tmp_path / "rot.jpg")
    assert loaded.shape[:2] == (image.width, image.height)


@pytest.mark.parametrize("mode", ["L", "I;16", "CMYK", "P", "LA"])
def test_odd_modes_become_rgb8(tmp_path, mode):
    base = Image.fromarray((np.random.default_rng(0).random((80, 90, 3)) * 255).astype(np.uint8))
    if mode == "I;16":
        image = Image.fromarray((np.arange(80 * 90).reshape(80, 90) * 8).astype(np.uint16))
        path = tmp_path / "x.png"
    else:
        image = base.convert(mode)
        path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    image.save(path)
    out = files.load_image(path)
    assert out.shape == (80, 90, 3) and out.dtype == np.uint8


def test_bad_inputs_raise_clear_errors(tmp_path, faces_dir):
    (tmp_path / "text.jpg").write_text("not an image")
    data = (faces_dir / "obama1.jpg").read_bytes()
    (tmp_path / "trunc.jpg").write_bytes(data[: len(data) // 3])
    Image.new("RGB", (32, 32)).save(tmp_path / "tiny.png")
    for name, needle in [("text.jpg", "not a readable image"), ("tiny.png", "too small"), ("nope.jpg", "no such file")]:
        with pytest.raises(files.ImageLoadError, match=needle):
            files.load_image(tmp_path / name)
    with pytest.raises(files.ImageLoadError):
        files.load_image(tmp_path / "trunc.jpg")
    with pytest.raises(files.ImageLoadError, match="decompression bomb"):
        files.load_image(faces_dir / "obama3.jpg", max_pixels=1_000_000)


def test_atomic_write_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), files.atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert not target.exists() and list(tmp_path.iterdir()) == []
    files.save_json(target, {"a": np.float32(1.5)})
    assert target.read_text().strip().startswith("{")


@dataclasses.dataclass(frozen=True)
class DemoConfig:
    steps: int = option(28, "sampling steps")
    scale: float = option(1.0, "guidance")
    mode: Literal["student", "teacher"] = option("student", "which model")
    is_fast: bool = option(False, "speed")


def test_config_precedence_and_unknown_keys(tmp_path):
    import argparse

    (tmp_path / "c.yaml").write_text("sampling:\n  steps: 10\n  scale: 2\n")
    parser = argparse.ArgumentParser()
    add_config_args(parser, DemoConfig, prefix="sampling")
    args = parser.parse_args(["--sampling-scale", "3.5", "--sampling-is-fast"])
    config = resolve_config(DemoConfig, args, load_config_file(tmp_path / "c.yaml"), prefix="sampling")
    assert config == DemoConfig(steps=10, scale=3.5, mode="student", is_fast=True)
    (tmp_path / "bad.toml").write_text("[sampling]\nstepz = 3\n")
    with pytest.raises(ValueError, match="stepz"):
        resolve_config(DemoConfig, None, load_config_file(tmp_path / "bad.toml"), prefix="sampling")
    with pytest.raises(SystemExit):
        parser.parse_args(["--sampling-mode", "bogus"])


def test_registry_lookup_and_missing_message(tmp_path, monkeypatch):
    registry = weights.load_registry()
    assert {"flux", "pulid_flux", "antelopev2", "apple_student"} <= set(registry)
    for spec in registry.values():
        assert spec.source and spec.licence and spec.path and spec.kind in ("file", "dir"), spec.name
    with pytest.raises(weights.MissingWeightError, match="pulid_flux_v0.9.1.safetensors") as info:
        weights.locate("pulid_flux", tmp_path)
    assert "guozinan/PuLID" in str(info.value) and "APPLESWAP_HOME" in str(info.value)
    target = tmp_path / "pulid" / "pulid_flux_v0.9.1.safetensors"
    target.parent.mkdir()
    target.write_bytes(b"x")
    assert weights.locate("pulid_flux", tmp_path) == target
    monkeypatch.setenv("APPLESWAP_HOME", str(tmp_path))
    assert weights.locate("pulid_flux") == target
    elsewhere = tmp_path / "p.safetensors"
    elsewhere.write_bytes(b"y")
    monkeypatch.setenv("APPLESWAP_WEIGHT_PULID_FLUX", str(elsewhere))
    assert weights.locate("pulid_flux") == elsewhere


def test_cli_help_and_weights_check(tmp_path):
    exe = Path(sys.executable).parent / "appleswap"
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, check=True).stdout
    assert "weights" in out
    out = subprocess.run([str(exe), "weights", "check", "--weights-dir", str(tmp_path)], capture_output=True,
                         text=True, check=True).stdout
    assert "missing" in out and str(tmp_path) in out


def test_every_subcommand_has_help(capsys):
    from appleswap.cli import build_parser, main

    parser = build_parser()
    commands = sorted(parser._subparsers._group_actions[0].choices)  # the registered subcommands
    expected = {"weights", "preprocess", "prepare-ids", "identity", "generate", "swap", "verify", "app", "train",
                "pseudo", "eval", "bench"}
    assert expected <= set(commands)
    for command in commands:
        with pytest.raises(SystemExit) as info:
            main([command, "--help"])
        assert info.value.code == 0
        assert "usage: appleswap" in capsys.readouterr().out


def test_read_tensor_file_refuses_pickled_code(tmp_path):
    import pickle

    import torch
    from safetensors.torch import save_file

    tensors = {"w": torch.arange(4.0)}
    save_file(tensors, str(tmp_path / "a.safetensors"))
    torch.save(tensors, tmp_path / "a.pth")
    for name in ("a.safetensors", "a.pth"):
        assert torch.equal(files.read_tensor_file(tmp_path / name)["w"], tensors["w"])

    class Evil:
        def __reduce__(self):
            return (print, ("pickled code ran",))

    (tmp_path / "evil.pth").write_bytes(pickle.dumps({"w": Evil()}))
    with pytest.raises(ValueError, match="weights_only"):
        files.read_tensor_file(tmp_path / "evil.pth", "test weights")
    with pytest.raises(FileNotFoundError, match="HopeNet weights not found"):
        files.read_tensor_file(tmp_path / "missing.pth", "HopeNet weights")


def test_inference_commands_use_cublaslt_without_a_workspace_unless_the_user_sets_one(tmp_path, monkeypatch):
    """``inference_blas_defaults``: swap and the other inference commands set CUBLASLT_WORKSPACE_SIZE=0 before any
    CUDA work (fewer memsets per graphed pass); a user's value wins; training keeps PyTorch's default."""
    from appleswap.cli import main

    name = "CUBLASLT_WORKSPACE_SIZE"
    monkeypatch.setenv(name, "restored-after-the-test")
    monkeypatch.delenv(name)
    missing = str(tmp_path / "missing.jpg")
    assert main(["train", "teacher", "--config", str(tmp_path / "missing.yaml")]) == 2
    assert name not in os.environ
    assert main(["swap", "-s", missing, "-t", missing, "-o", str(tmp_path / "out.jpg")]) == 2  # fails on the input
    assert os.environ[name] == "0"
    monkeypatch.setenv(name, "4096")
    assert main(["swap", "-s", missing, "-t", missing, "-o", str(tmp_path / "out.jpg")]) == 2
    assert os.environ[name] == "4096"
