"""Each speed profile of :mod:`appleswap.speed` against the reference path (the plain eager model) on a tiny model.

On the CPU ``compiled`` runs its fused projections (compile and CUDA graphs are GPU-only) and must give the same
function; ``fp8`` and ``offload`` change the numerics by the fp8 rounding only, and ``offload`` streams the blocks.
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

from appleswap.speed import SPEED_PROFILES, attach_speed, speed_options
from tests.fixtures.tiny_flux import one_thread  # noqa: F401
from tests.speed.test_speed_options import _call, _full_model, _inputs


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


@pytest.fixture(scope="module")
def reference():
    torch.manual_seed(0)
    model, inp = _full_model(), _inputs()
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
    assert fast.is_fused() == (profile in ("compiled", "fp8"))
    assert (fast.offloader is not None) == (profile == "offload")


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(ValueError, match="'turbo' is unknown; choose one of eager, compiled, fp8, offload"):
        speed_options("turbo")
