"""Per-step inputs computed once for a whole schedule and handed out in call order, without a host wait.

The main tokens' AdaLN rows depend only on the timestep, so a swap computes them for every timestep its solver
will evaluate (:func:`call_sigmas`) in one matmul per layer. During sampling the k-th model call takes row k; the
sigma it was really called at is compared with the k-th scheduled one on the device (no synchronisation per
step), and :meth:`StepTable.verify` raises after sampling if a solver ever evaluated a different sigma.
"""

from __future__ import annotations

import torch

from appleswap.devices import upload


def call_sigmas(sigmas: torch.Tensor, order: int = 1, inverse: bool = False) -> torch.Tensor:
    """The sigmas at which ``sample_euler`` / ``sample_midpoint`` (``order`` 1 / 2) or ``invert`` (``inverse``)
    evaluate the model over the generation schedule ``sigmas``, in call order, as float32 (the solvers' arithmetic,
    so midpoints match bit for bit)."""
    if order not in (1, 2):
        raise ValueError(f"order must be 1 or 2, got {order}")
    grid = sigmas.detach().to("cpu", torch.float32)
    grid = grid.flip(0) if inverse else grid
    if order == 1:
        return grid[:-1].clone()
    starts, ends = grid[:-1], grid[1:]
    return torch.stack([starts, starts + (ends - starts) / 2], dim=1).reshape(-1)


class StepTable:
    """Row k of ``table`` (anything with ``step(k)``, e.g. ``TimestepModulation``) for the k-th call.

    Args:
        table: the precomputed rows, one per entry of ``sigmas``.
        sigmas: the sigmas of the calls, in order (:func:`call_sigmas`).
    """

    def __init__(self, table, sigmas: torch.Tensor, device: torch.device | str):
        self.table, self.sigmas = table, upload(sigmas.float(), device)
        self.calls = 0
        self.mismatch = torch.zeros((), device=device)

    def __call__(self, sigma: torch.Tensor):
        """The rows for this call; ``sigma`` (B,) is the solver's sigma (checked on the device, lazily)."""
        if self.calls >= len(self.sigmas):
            raise RuntimeError(f"the solver evaluated the model more than the {len(self.sigmas)} times its schedule "
                               "has rows for")
        self.mismatch.add_((sigma.reshape(-1)[0].float() - self.sigmas[self.calls]).abs())
        self.calls += 1
        return self.table.step(self.calls - 1)

    def verify(self) -> None:
        """Raise if any call was at another sigma than scheduled (one host wait, after sampling)."""
        if self.mismatch.item() > 1e-6:
            raise RuntimeError("the solver evaluated the model at other sigmas than the precomputed schedule; the "
                               "per-step rows were wrong (a bug: please report it)")
