"""Schedule-wide per-step rows: the predicted call sigmas must be exactly the solvers' calls, and a table used
out of order must be caught."""

from __future__ import annotations

import pytest
import torch

from appleswap.sampling import get_schedule, invert, sample_euler, sample_midpoint
from appleswap.speed.steps import StepTable, call_sigmas


def _recorded(solver, sigmas, **kwargs) -> torch.Tensor:
    seen = []

    def model(x, sigma):
        seen.append(sigma[0].item())
        return torch.zeros_like(x) + 0.1

    solver(model, torch.randn(2, 4, 8), sigmas, disable=True, **kwargs)
    return torch.tensor(seen, dtype=torch.float32)


@pytest.mark.parametrize("steps", [1, 5, 28])
def test_call_sigmas_are_exactly_the_solvers_calls(steps):
    sigmas = get_schedule(steps, 1024)
    assert torch.equal(call_sigmas(sigmas), _recorded(sample_euler, sigmas))
    assert torch.equal(call_sigmas(sigmas, order=2), _recorded(sample_midpoint, sigmas))
    assert torch.equal(call_sigmas(sigmas, inverse=True), _recorded(invert, sigmas))
    assert torch.equal(call_sigmas(sigmas, order=2, inverse=True), _recorded(invert, sigmas, order=2))
    assert torch.equal(call_sigmas(sigmas, order=2, inverse=True),
                       _recorded(invert, sigmas, order=2, parity_wrong_midpoint=True))
    assert len(call_sigmas(sigmas, order=2)) == 2 * steps


class _Rows:
    def __init__(self, count):
        self.rows = torch.arange(count, dtype=torch.float32)[:, None]

    def step(self, index):
        return self.rows[index:index + 1]


def test_step_table_hands_out_rows_in_order_and_catches_misuse():
    sigmas = call_sigmas(get_schedule(3, 256))
    table = StepTable(_Rows(3), sigmas, "cpu")
    assert [table(sigma.expand(2)).item() for sigma in sigmas] == [0.0, 1.0, 2.0]
    table.verify()
    with pytest.raises(RuntimeError, match="more than the 3 times"):
        table(sigmas[:1])
    wrong = StepTable(_Rows(3), sigmas, "cpu")
    wrong(sigmas[1:2])  # the first call at the second sigma: the row would be wrong
    with pytest.raises(RuntimeError, match="other sigmas"):
        wrong.verify()


def test_upload_queues_host_tensors_for_cuda_through_pinned_memory(monkeypatch):
    """Host tensors bound for a CUDA device go through pinned memory with a non-blocking copy (the host does not wait
    for the GPU's queue); everything else is a plain ``.to``."""
    from appleswap.devices import upload

    x = torch.randn(4, 3)
    assert upload(x, None) is x and upload(x, "cpu") is x
    calls = []
    monkeypatch.setattr(torch.Tensor, "pin_memory", lambda self: calls.append("pin") or self)
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: calls.append((str(a[0]), k)) or self)
    assert upload(x, "cuda:0") is x
    assert calls == ["pin", ("cuda:0", {"non_blocking": True})]
