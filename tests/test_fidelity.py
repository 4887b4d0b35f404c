"""Fidelity to the released code: the fixed mismatches (M8, M15) and the ``--parity`` preset on every command."""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

import appleswap.pipeline as pipeline_module
from appleswap.parity import PARITY, apply_parity, parity_rows, parity_settings
from appleswap.pipeline import SwapPipeline
from tests.fixtures.tiny_flux import make_tiny_weights, one_thread, tiny_id_tokens  # noqa: F401


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def student(weights):
    return SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu")


def _corr(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.flatten().double(), b.flatten().double()
    a, b = a - a.mean(), b - b.mean()
    return float((a @ b) / (a.norm() * b.norm()))


def test_condition_noise_is_independent_of_the_start_noise(student, monkeypatch):
    """M8: for one seed, the condition latent's posterior noise and x_T are uncorrelated (they were one stream)."""
    face = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    seen = {}
    encode, sampler = student.encode_latents, pipeline_module.sample_euler

    def record_encode(images, sample, seeds):
        tokens = encode(images, sample, seeds)
        if sample:
            seen["condition"] = tokens
        return tokens

    def record_sampler(model, x, sigmas, **kwargs):
        seen["x_T"] = x.clone()
        return sampler(model, x, sigmas, **kwargs)

    monkeypatch.setattr(student, "encode_latents", record_encode)
    monkeypatch.setattr(pipeline_module, "sample_euler", record_sampler)
    first = student(tiny_id_tokens(1), face, num_steps=1, seed=0)
    mode = encode(torch.from_numpy(face).permute(2, 0, 1)[None].float() / 255, False, [0])
    posterior_noise = seen["condition"] - mode
    assert posterior_noise.numel() >= 16384 and posterior_noise.abs().mean() > 0
    assert abs(_corr(posterior_noise, seen["x_T"])) < 0.05
    condition = seen["condition"]
    np.testing.assert_array_equal(student(tiny_id_tokens(1), face, num_steps=1, seed=0), first)  # still seeded
    torch.testing.assert_close(seen["condition"], condition, rtol=0, atol=0)
    student(tiny_id_tokens(1), face, num_steps=1, seed=1)
    assert not torch.equal(seen["condition"], condition)  # and per seed


def test_black_condition_is_the_mode_by_default_and_a_sample_under_parity(weights, student, monkeypatch):
    """M1: the release samples the black latent of image guidance; we take its mode unless parity."""
    parity = SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu", parity=True)
    face = (np.random.default_rng(1).random((64, 64, 3)) * 255).astype(np.uint8)
    for pipe, sampled in ((student, False), (parity, True)):
        calls = []
        encode = pipe.encode_latents
        monkeypatch.setattr(pipe, "encode_latents",
                            lambda images, sample, seeds, e=encode, c=calls: c.append(sample) or e(images, sample, seeds))
        pipe(tiny_id_tokens(1), face, num_steps=1, image_guidance_scale=2.0)
        assert calls == [True, sampled]  # condition (always sampled), then the black latent


def test_pipeline_parity_sets_every_pipeline_row(weights, student):
    parity = SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu", parity=True)
    rows = parity_rows("pipeline")
    assert {row.name for row in rows} == {"id_dtype", "black_condition", "inversion_order", "parity_wrong_midpoint"}
    for row in rows:
        assert getattr(parity, row.name) == row.value and getattr(student, row.name) != row.value, row.name


# ---- every CLI's --parity

def _parse(argv: list[str]) -> argparse.Namespace:
    from appleswap.cli import build_parser

    return build_parser().parse_args(argv)


def _resolved(command: str, argv: list[str]):
    """The config the command would run with, as its ``run`` builds it."""
    from appleswap.config import resolve_config

    args = _parse(argv)
    if command == "preprocess":
        from appleswap.preprocess.runner import PreprocessConfig as cls
    elif command == "generate":
        from appleswap.generate import GenerateConfig as cls
    elif command == "swap":
        from appleswap.app.swapper import SwapConfig as cls
    elif command == "pseudo":
        from appleswap.train.config import PseudoConfig as cls
    elif command == "prepare-ids":
        from appleswap.identity.cli import PrepareIdsConfig as cls
    else:
        from appleswap.identity.cli import EncoderOptions as cls
    return apply_parity(resolve_config(cls, args, {}), command)


COMMAND_LINES = {
    "preprocess": ["preprocess", "in", "out"],
    "generate": ["generate", "--mode", "teacher"],
    "swap": ["swap", "-s", "a.jpg", "-t", "b.jpg", "-o", "c.jpg"],
    "pseudo": ["pseudo"],
    "prepare-ids": ["prepare-ids", "data", "--cache", "ids"],
    "identity": ["identity", "-s", "a.jpg", "-o", "a.safetensors"],
}


@pytest.mark.parametrize("command", sorted(COMMAND_LINES))
def test_each_cli_parity_sets_every_documented_setting(command):
    rows = parity_rows(command)
    assert rows, command
    plain = _resolved(command, COMMAND_LINES[command])
    config = _resolved(command, [*COMMAND_LINES[command], "--parity"])
    assert config.parity and not plain.parity
    for row in rows:
        assert getattr(config, row.name) == row.value, (command, row.name)
    # the defaults are the corrected behaviour: parity changes settings here, or the model (pipeline rows, below)
    assert any(getattr(plain, row.name) != row.value for row in rows) or command in ("swap", "pseudo"), command


class _Loaded(Exception):
    pass


def _record_from_pretrained(monkeypatch) -> dict:
    seen = {}

    def record(cls, *args, **kwargs):
        seen.update(kwargs)
        raise _Loaded

    monkeypatch.setattr(SwapPipeline, "from_pretrained", classmethod(record))
    return seen


def test_generate_and_swap_hand_parity_to_the_pipeline(monkeypatch, tmp_path, faces_dir):
    import shutil

    from appleswap.app.swapper import load_generator
    from appleswap.generate import generate

    seen = _record_from_pretrained(monkeypatch)
    with pytest.raises(_Loaded):
        load_generator(_resolved("swap", [*COMMAND_LINES["swap"], "--parity"]), device="cpu")
    assert seen["parity"] is True
    for folder in ("src", "trg"):
        (tmp_path / folder).mkdir()
        shutil.copy(faces_dir / "obama1.jpg", tmp_path / folder / "a.jpg")
    seen.clear()
    with pytest.raises(_Loaded):
        generate(_resolved("generate", ["generate", "--data", str(tmp_path), "--output", str(tmp_path / "o"),
                                        "--parity"]), device="cpu")
    assert seen["parity"] is True


def test_parity_rows_with_conditions_and_documentation():
    from pathlib import Path

    from appleswap.preprocess.runner import PreprocessConfig

    assert parity_settings("preprocess", PreprocessConfig(landmarks="reference", parser="mine.pth")) == {
        "parser_double_norm": True, "occlusion_flip": "only", "occlusion": "auto"}  # chosen inputs are kept
    student_cfg = _resolved("generate", ["generate", "--parity"])
    assert student_cfg.invert is False and student_cfg.inversion_order == 2  # the student script has no inversion
    docs = (Path(__file__).parent.parent / "docs" / "fidelity.md").read_text()
    for row in PARITY:
        assert f"`{row.name}`" in docs, row.name


def test_generate_source_reaches_the_identity_encoder_unstretched(tmp_path, faces_dir):
    """M15: a 2:1 source keeps its aspect ratio (long side shrunk to 1024 only when larger), never 512 x 512."""
    from PIL import Image

    from appleswap.generate import Pair, SourceTokens

    class RecordingPipe:
        def __init__(self):
            self.seen = []

        def encode_source(self, source):
            self.seen.append(source)
            return torch.zeros(1, 32, 8)

    photo = Image.open(faces_dir / "obama1.jpg").convert("RGB")
    pipe = RecordingPipe()
    tokens = SourceTokens(pipe, None, 512)
    for size, expected in (((600, 300), (300, 600)), ((2400, 1200), (512, 1024))):
        path = tmp_path / f"wide_{size[0]}.png"
        photo.resize(size, Image.BICUBIC).save(path)
        tokens(Pair(path.stem, path, path))
        seen = pipe.seen[-1]
        assert isinstance(seen, np.ndarray) and seen.shape == (*expected, 3), size
    small = np.asarray(photo.resize((600, 300), Image.BICUBIC))
    np.testing.assert_array_equal(pipe.seen[0], small)  # not resampled at all when it fits
