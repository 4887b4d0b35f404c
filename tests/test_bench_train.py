"""``benchmarks/bench_train_step.py --tiny --device cpu`` runs the real training step end to end and prints the
table; the batch sweep stops at the first out-of-memory batch and reports the largest one that fit."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

from tests.fixtures.tiny_flux import one_thread  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def _table_rows(text: str) -> list[list[str]]:
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| batch")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_tiny_mode_prints_one_row_per_batch(bench, capsys):
    assert bench.main(["--tiny", "--device", "cpu", "--batches", "1,2", "--repeats", "1", "--warmup", "1",
                       "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert "tiny config" in out and "LoRA r64" in out and "ID loss (arcface 1,1,1,1) + LPIPS-VGG" in out
    rows = _table_rows(out)
    assert [row[0] for row in rows] == ["1", "2"]
    for batch, seconds, samples, _, note in rows:
        assert float(seconds) > 0 and math.isclose(float(samples), int(batch) / float(seconds), rel_tol=0.01)
        # every sample decoded and paid for both auxiliary losses (gates at t <= 1)
        values = dict(part.strip().split(" ")[-2:] for part in note.removeprefix("loss ").split(","))
        assert all(math.isfinite(float(values[k])) and float(values[k]) > 0 for k in ("fm", "id", "lpips"))
    assert "largest batch that fit: 2 (no OOM in the sweep)" in out


def test_sweep_stops_at_first_oom(bench):
    tried, freed = [], []

    def run_batch(size: int):
        tried.append(size)
        if size > 4:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return bench.BatchRow(size, 0.5 * size, 10.0 + size)

    rows = bench.sweep(run_batch, bench.batch_sizes(None, 32), lambda: freed.append(True))
    assert tried == [1, 2, 4, 8] and freed == [True]
    assert bench.largest_fit(rows) == 4 and bench.ran_out_of_memory(rows)
    table = bench.format_table(rows)
    assert "| 8 | OOM | - | - | out of memory |" in table and "| 4 | 2.000 | 2.000 | 14.00 |" in table


def test_batch_sizes_and_time_budget(bench):
    assert bench.batch_sizes(None, 20) == [1, 2, 4, 8, 12, 16, 20]
    assert bench.batch_sizes("3,5", 64) == [3, 5]
    with pytest.raises(ValueError, match="--batches"):
        bench.batch_sizes("0,2", 64)
    rows = bench.sweep(lambda size: bench.BatchRow(size, 1.0, 1.0), [1, 2], lambda: None, deadline=0.0)
    assert len(rows) == 1 and rows[0].seconds is None and "not run" in rows[0].note
    assert bench.largest_fit(rows) == 0 and not bench.ran_out_of_memory(rows)
