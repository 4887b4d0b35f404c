"""Each speed profile of :mod:`appleswap.speed` against the reference path (the plain eager model) on a tiny model.

On the CPU ``compiled`` runs its fused projections (compile and CUDA graphs are GPU-only) and must give the same
function; ``fp8`` and ``offload`` change the numerics by the fp8 rounding only, and ``offload`` streams the blocks.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from appleswap.model.transformer import AppleTransformer
from appleswap.speed import SPEED_PROFILES, attach_speed, speed_options
from appleswap.speed.transformer import FastAppleTransformer
from tests.fixtures.tiny_flux import one_thread  # noqa: F401
from tests.speed.test_speed_options import _call, _full_model, _inputs, _reference


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model, inp = _reference(_full_model()), _inputs()  # the plain AppleTransformer
    with torch.no_grad():
        return model, inp, _call(model, inp)


@pytest.mark.parametrize("profile", SPEED_PROFILES)
@torch.no_grad()
def test_every_profile_computes_the_reference_function(reference, profile):
    model, inp, expected = reference
    fast = attach_speed(copy.deepcopy(model), "cpu", **dataclasses.asdict(speed_options(profile)))
    difference = _relative(_call(fast, inp), expected)
    if profile in ("fp8", "offload"):  # the profiles that quantise the blocks to e4m3
        assert 0 < difference < 0.1, difference  # e4m3 rounding, bounded
    else:
        assert difference < 1e-5, difference
    if profile == "eager":  # the reference model itself: no speed object at all
        assert type(fast) is AppleTransformer
        return
    assert isinstance(fast, FastAppleTransformer)
    assert fast.is_fused() == (profile in ("compiled", "fp8"))
    assert (fast.offloader is not None) == (profile == "offload")


@torch.no_grad()
def test_fast_forward_without_options_and_with_every_precomputed_input_equals_the_reference(reference):
    """The fast forward's own path (in-place residuals, precomputed AdaLN rows, pass constants) against the
    reference forward, before any option is switched on."""
    model, inp, expected = reference
    fast = FastAppleTransformer.from_reference(model)
    assert fast.flux is model.flux  # shared modules, not a copy
    torch.testing.assert_close(_call(fast, inp), expected, rtol=1e-5, atol=1e-5)
    text, same = inp["text"], dict(inp, timestep=torch.tensor([0.7, 0.7]), guidance=torch.tensor([3.5, 3.5]))
    modulation = fast.condition_modulation(text)
    table = fast.joined_modulation(fast.timestep_modulation(torch.tensor([0.7]), text, 3.5), modulation)
    constants = fast.pass_constants(text, inp["img_ids"], inp["id_tokens"].expand(2, -1, -1))
    shared = {"modulation": modulation, "timestep_modulation": table.step(0), "constants": constants}
    torch.testing.assert_close(_call(fast, dict(same, id_tokens=None), **shared), _call(model, same),
                               rtol=1e-5, atol=1e-5)


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="'turbo' is unknown; choose one of eager, compiled, fp8, offload"):
        speed_options("turbo")


def test_the_commands_speed_flag_reaches_the_pipeline(monkeypatch, tmp_path, faces_dir):
    """``--speed`` on `swap` and `generate` is handed to ``SwapPipeline.from_pretrained`` (which applies it);
    without it the pipeline gets None and the separate flags decide."""
    import shutil

    from appleswap.app.swapper import load_generator
    from appleswap.generate import generate
    from tests.test_fidelity import COMMAND_LINES, _Loaded, _record_from_pretrained, _resolved

    seen = _record_from_pretrained(monkeypatch)
    for flags, expected in (([], None), (["--speed", "eager"], "eager"), (["--speed", "fp8"], "fp8")):
        seen.clear()
        with pytest.raises(_Loaded):
            load_generator(_resolved("swap", [*COMMAND_LINES["swap"], *flags]), device="cpu")
        assert seen["speed"] == expected
    for folder in ("src", "trg"):
        (tmp_path / folder).mkdir()
        shutil.copy(faces_dir / "obama1.jpg", tmp_path / folder / "a.jpg")
    seen.clear()
    with pytest.raises(_Loaded):
        generate(_resolved("generate", ["generate", "--data", str(tmp_path), "--output", str(tmp_path / "o"),
                                        "--speed", "compiled"]), device="cpu")
    assert seen["speed"] == "compiled"
