"""Schedule constants, guidance wrappers, solver dtypes and input checks against numbers worked out by hand
(the gaps the mutation run of sampling/ showed)."""

from __future__ import annotations

import math

import pytest
import torch

from appleswap.sampling import (
    combine_guidance,
    compute_mu,
    get_schedule,
    inversion_sigmas,
    invert,
    sample_euler,
    sample_midpoint,
    with_batched_guidance,
    with_id_guidance,
    with_image_guidance,
)
from appleswap.sampling.schedule import schedule_from_scheduler_config
from appleswap.speed.steps import StepTable, call_sigmas


def test_mu_is_linear_between_flux_defaults():
    assert compute_mu(256) == pytest.approx(0.5)
    assert compute_mu(4096) == pytest.approx(1.15)
    assert compute_mu(1024) == pytest.approx(0.5 + 0.65 * 768 / 3840)
    assert compute_mu(100, base_seq_len=100, max_seq_len=200, base_shift=0.2, max_shift=0.9) == pytest.approx(0.2)
    assert compute_mu(200, base_seq_len=100, max_seq_len=200, base_shift=0.2, max_shift=0.9) == pytest.approx(0.9)


def _by_hand(steps, mu):
    return [math.exp(mu) / (math.exp(mu) + 1 / s - 1) for s in (1 - i * (1 - 1 / steps) / (steps - 1)
                                                               for i in range(steps))] + [0.0]


def test_schedule_from_a_scheduler_config_uses_every_constant():
    config = {"base_image_seq_len": 100, "max_image_seq_len": 300, "base_shift": 0.3, "max_shift": 2.0,
              "use_dynamic_shifting": True}
    mu = 0.3 + (2.0 - 0.3) * (250 - 100) / (300 - 100)
    got = schedule_from_scheduler_config(config, 6, 250)
    assert got.dtype == torch.float32 and got.shape == (7,)
    torch.testing.assert_close(got, torch.tensor(_by_hand(6, mu), dtype=torch.float32), rtol=1e-6, atol=1e-7)
    linear = schedule_from_scheduler_config({**config, "use_dynamic_shifting": False}, 4, 250)
    torch.testing.assert_close(linear, torch.tensor([1.0, 0.75, 0.5, 0.25, 0.0]))
    torch.testing.assert_close(schedule_from_scheduler_config({}, 5, 1024), get_schedule(5, 1024))
    torch.testing.assert_close(get_schedule(5, 1024), torch.tensor(_by_hand(5, compute_mu(1024)), dtype=torch.float32),
                               rtol=1e-6, atol=1e-7)


def _model(offset):
    """A velocity that depends on x, sigma and the variant (so a dropped argument shows)."""
    return lambda x, sigma: x * sigma[:, None] + offset


def test_single_guidance_wrappers_follow_their_formulas():
    x, sigma = torch.tensor([[1.0, 2.0]]), torch.tensor([0.5])
    v, v_null = x * 0.5 + 3.0, x * 0.5 + 1.0
    for wrap, scale in ((with_image_guidance, 2.0), (with_image_guidance, 3.5), (with_id_guidance, 2.0),
                        (with_id_guidance, 0.5)):
        guided = wrap(_model(3.0), _model(1.0), scale)
        torch.testing.assert_close(guided(x, sigma), v_null + scale * (v - v_null))
        assert wrap(_model(3.0), _model(1.0), 1.0)(x, sigma).equal(v)


@pytest.mark.parametrize(("image_scale", "id_scale"), [(1.0, 1.0), (2.0, 1.0), (1.0, 2.0), (2.0, 3.0), (1.5, 1.0)])
def test_batched_guidance_pops_the_right_variants(image_scale, id_scale):
    x, sigma = torch.tensor([[1.0, 2.0]]), torch.tensor([0.25])

    def multi(x, sigma):
        outputs = [_model(3.0)(x, sigma)]
        if image_scale != 1.0:
            outputs.append(_model(1.0)(x, sigma))
        if id_scale != 1.0:
            outputs.append(_model(-2.0)(x, sigma))
        return outputs

    v, v_black, v_null = (x * 0.25 + c for c in (3.0, 1.0, -2.0))
    want = v + (image_scale - 1) * (v - v_black) + (id_scale - 1) * (v - v_null)
    torch.testing.assert_close(with_batched_guidance(multi, image_scale, id_scale)(x, sigma), want)
    if image_scale == id_scale == 1.0:  # the defaults are no guidance at all
        torch.testing.assert_close(with_batched_guidance(multi)(x, sigma), v)


def test_guidance_without_its_null_prediction_says_which():
    v = torch.ones(1, 2)
    with pytest.raises(ValueError, match="^image_scale != 1 needs the black-condition prediction$"):
        combine_guidance(v, image_scale=2.0)
    with pytest.raises(ValueError, match="^id_scale != 1 needs the null-ID prediction$"):
        combine_guidance(v, null_image=v, image_scale=2.0, id_scale=2.0)


@pytest.mark.parametrize("solver", [sample_euler, sample_midpoint])
def test_solvers_keep_the_latents_dtype(solver):
    x = torch.ones(1, 4, dtype=torch.bfloat16)
    out = solver(lambda x, s: -x, x, get_schedule(3, 256), disable=True)
    assert out.dtype == torch.bfloat16
    assert invert(lambda x, s: -x, x, get_schedule(3, 256), order=2, disable=True).dtype == torch.bfloat16


def test_schedule_checks_name_the_problem():
    model = _model(0.0)
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match=r"1-D tensor of >= 2 values, got shape \(1,\)"):
        sample_euler(model, x, torch.tensor([1.0]), disable=True)
    with pytest.raises(ValueError, match=r"got shape \(2, 2\)"):
        sample_euler(model, x, torch.ones(2, 2), disable=True)
    for flat in (torch.tensor([1.0, 0.5, 0.5, 0.0]), torch.tensor([1.0, 0.5, 0.6, 0.0])):
        with pytest.raises(ValueError, match=r"^sigmas must decrease \(from noise to data\) for sampling$"):
            sample_euler(model, x, flat, disable=True)
        with pytest.raises(ValueError, match=r"^sigmas must increase \(from data to noise\) for inversion$"):
            invert(model, x, flat, disable=True)
    # a schedule over more than one unit (diffs >= 1) is still a valid decreasing schedule
    assert sample_euler(model, x, torch.tensor([3.0, 1.5, 0.0]), disable=True).shape == (1, 2)
    assert invert(model, x, torch.tensor([3.0, 1.5, 0.0]), disable=True).shape == (1, 2)


def test_inversion_sigmas_accepts_exactly_one_to_all_steps():
    sigmas = get_schedule(4, 256)
    assert inversion_sigmas(sigmas, 1).equal(sigmas[3:])
    assert inversion_sigmas(sigmas, 4).equal(sigmas)
    for bad in (0, 5):
        with pytest.raises(ValueError, match="inverse_steps must be in 1..4"):
            inversion_sigmas(sigmas, bad)


def test_call_sigmas_are_float32_and_checked():
    sigmas = get_schedule(3, 256).double()
    assert call_sigmas(sigmas).dtype == torch.float32 and call_sigmas(sigmas, order=2).dtype == torch.float32
    with pytest.raises(ValueError, match="order must be 1 or 2, got 3"):
        call_sigmas(sigmas, order=3)


class _Rows:
    def step(self, index):
        return index


def test_step_table_errors_name_the_misuse():
    table = StepTable(_Rows(), torch.tensor([1.0, 0.5]), "cpu")
    assert table(torch.tensor([1.0])) == 0 and table(torch.tensor([0.5])) == 1
    table.verify()
    with pytest.raises(RuntimeError, match="more than the 2 times its schedule has rows for"):
        table(torch.tensor([0.0]))
    wrong = StepTable(_Rows(), torch.tensor([1.0, 0.5]), "cpu")
    wrong(torch.tensor([1.0]))
    wrong(torch.tensor([0.4]))
    with pytest.raises(RuntimeError, match="other sigmas than the precomputed schedule; the per-step rows were wrong"):
        wrong.verify()
