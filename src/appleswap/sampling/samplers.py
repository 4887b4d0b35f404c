"""Flow-matching ODE solvers as plain functions over ``model(x, sigma) -> velocity`` (k-diffusion style).

Convention (FLUX): x_sigma = (1 - sigma) x0 + sigma * noise, the model predicts v = noise - x0, so the ODE is
dx/dsigma = v. Sampling integrates sigma from 1 down to 0; inversion integrates the same ODE from 0 up to 1.
Every update is done in float32 and cast back, as diffusers' FlowMatchEulerDiscreteScheduler does.

Progress: each solver draws a tqdm bar with ETA on stderr unless ``disable`` (None: only on a terminal), and
calls ``callback`` after every step with ``{"x", "i", "total", "sigma", "phase"}`` (a UI's progress, a
preview; ``phase``: ``"sampling"`` or ``"inverting"``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from tqdm.auto import tqdm

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict], None]


def _sigma(value: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return value.to(x.device, torch.float32).expand(x.shape[0])  # (B,)


def _euler_update(x: torch.Tensor, velocity: torch.Tensor, step: torch.Tensor) -> torch.Tensor:
    return (x.float() + step.float() * velocity.float()).to(x.dtype)


def _on_device(sigmas: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The schedule on the latents' device, copied once: a per-step host-to-device copy of a scalar would make
    the host wait for the previous pass every step, leaving the GPU idle while it prepares the next one. Pass
    the schedule on the CPU: the checks then need no device round trip either."""
    return sigmas.to(x.device, torch.float32)


def _steps(count: int, disable: bool | None, desc: str):
    return tqdm(range(count), disable=disable, desc=desc, unit="step", leave=False)


def _check_sigmas(sigmas: torch.Tensor, descending: bool) -> None:
    if sigmas.ndim != 1 or sigmas.numel() < 2:
        raise ValueError(f"sigmas must be a 1-D tensor of >= 2 values, got shape {tuple(sigmas.shape)}")
    diffs = sigmas[1:] - sigmas[:-1]
    if descending and not bool((diffs < 0).all()):
        raise ValueError("sigmas must decrease (from noise to data) for sampling")
    if not descending and not bool((diffs > 0).all()):
        raise ValueError("sigmas must increase (from data to noise) for inversion")


@torch.no_grad()
def sample_euler(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                 disable: bool | None = False) -> torch.Tensor:
    """Explicit Euler on dx/dsigma = v (Karras et al. 2022, Alg. 1 without churn): x <- x + (s_next - s) v(x, s)."""
    _check_sigmas(sigmas, descending=True)
    sigmas = _on_device(sigmas, x)
    total = len(sigmas) - 1
    for i in _steps(total, disable, "sampling"):
        velocity = model(x, _sigma(sigmas[i], x))
        if callback is not None:
            callback({"x": x, "i": i, "total": total, "sigma": sigmas[i], "velocity": velocity, "phase": "sampling"})
        x = _euler_update(x, velocity, sigmas[i + 1] - sigmas[i])
    return x


@torch.no_grad()
def sample_midpoint(model: Model, x: torch.Tensor, sigmas: torch.Tensor, callback: Callback | None = None,
                    disable: bool | None = False) -> torch.Tensor:
    """Explicit midpoint (2nd order, 2 passes/step): x <- x + h v(x + h/2 v(x, s), s + h/2)."""
    _check_sigmas(sigmas, descending=True)
    sigmas = _on_device(sigmas, x)
    total = len(sigmas) - 1
    for i in _steps(total, disable, "sampling"):
        x = _midpoint_step(model, x, sigmas[i], sigmas[i + 1], wrong_latent=False)
        if callback is not None:
            callback({"x": x, "i": i, "total": total, "sigma": sigmas[i + 1], "phase": "sampling"})
    return x


def _midpoint_step(model: Model, x: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor,
                   wrong_latent: bool) -> torch.Tensor:
    """One RF-Solver-style step: x + h v + h^2/2 * dv, dv = (v_mid - v) / (h/2).

    With ``wrong_latent`` the mid velocity is evaluated at the CURRENT latent with the midpoint time, the
    reference's ``--second_order`` bug (parity only); otherwise at the midpoint latent (true 2nd order).
    """
    step = sigma_next - sigma
    velocity = model(x, _sigma(sigma, x))
    mid_latent = x if wrong_latent else _euler_update(x, velocity, step / 2)
    mid_velocity = model(mid_latent, _sigma(sigma + step / 2, x))
    derivative = (mid_velocity.float() - velocity.float()) / (step.float() / 2)
    return (x.float() + step.float() * velocity.float() + 0.5 * step.float() ** 2 * derivative).to(x.dtype)


@torch.no_grad()
def invert(model: Model, x0: torch.Tensor, sigmas: torch.Tensor, order: int = 1, parity_wrong_midpoint: bool = False,
           callback: Callback | None = None, disable: bool | None = False) -> torch.Tensor:
    """Integrate the ODE from data (sigmas[-1], usually 0) up to sigmas[0] over the REVERSED generation schedule.

    ``sigmas`` is the generation schedule (descending, e.g. ``get_schedule(...)`` or a tail of it for a partial
    inversion); the first evaluation is at the clean latent. Regenerating with ``sample_euler`` over the same
    ``sigmas`` starts where this ends.

    Args:
        order: 1 = explicit Euler (the reference); 2 = explicit midpoint (2 passes per step).
        parity_wrong_midpoint: with order 2, reproduce the reference's ``--second_order`` (mid velocity at the
            current latent: x + h v(x, s + h/2)); for parity runs only.
    """
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    if parity_wrong_midpoint and order != 2:
        raise ValueError("parity_wrong_midpoint only applies to order=2")
    ascending = sigmas.flip(0)
    _check_sigmas(ascending, descending=False)
    ascending = _on_device(ascending, x0)
    x = x0
    total = len(ascending) - 1
    for i in _steps(total, disable, "inverting"):
        if order == 1:
            velocity = model(x, _sigma(ascending[i], x))
            x = _euler_update(x, velocity, ascending[i + 1] - ascending[i])
        else:
            x = _midpoint_step(model, x, ascending[i], ascending[i + 1], wrong_latent=parity_wrong_midpoint)
        if callback is not None:
            callback({"x": x, "i": i, "total": total, "sigma": ascending[i + 1], "phase": "inverting"})
    return x


def inversion_sigmas(sigmas: torch.Tensor, inverse_steps: int) -> torch.Tensor:
    """The tail of a generation schedule covering its last ``inverse_steps`` steps (ends at 0).

    Invert over it and regenerate over it: the regeneration then starts at the noise level the inversion reached
    (the reference instead restarts from sigma = 1, which is wrong for ``inverse_steps < num_steps``).
    """
    num_steps = len(sigmas) - 1
    if not 1 <= inverse_steps <= num_steps:
        raise ValueError(f"inverse_steps must be in 1..{num_steps}, got {inverse_steps}")
    return sigmas[num_steps - inverse_steps:]
