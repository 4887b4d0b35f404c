"""``benchmarks/bench_pseudo.py --tiny --device cpu`` runs the real PseudoGenerator at batch 1 and 2 (fp8 blocks,
the longer set-up path; bf16 differs only in not quantising) and prints triplets/h; the batched triplets equal the
batch-1 ones."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest

from tests.fixtures.tiny_flux import one_thread  # noqa: F401

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_pseudo.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_pseudo", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_tiny_mode_prints_triplets_per_hour_for_each_batch(bench, capsys):
    assert bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--batches", "2", "--precisions", "fp8",
                       "--repeats", "1", "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert "2 passes per pair" in out and "tiny config" in out
    rows = [[cell.strip() for cell in line.strip("|").split("|")] for line in out.splitlines()
            if line.startswith("| ") and not line.startswith("| measure")]
    assert [row[0] for row in rows] == ["fp32 (tiny) + fp8 blocks, batch 1", "fp32 (tiny) + fp8 blocks, batch 2"]
    assert all(row[2] == "triplets/h" and float(row[1]) > 0 for row in rows)
    differences = [float(re.search(r"max abs. difference to batch 1 (\S+)", row[3]).group(1)) for row in rows[1::2]]
    assert max(differences) < 1e-4  # fp32: a pair's triplet does not depend on its batch


def test_bad_arguments_are_a_usage_error(bench):
    with pytest.raises(SystemExit):
        bench.main(["--tiny", "--device", "cpu", "--precisions", "fp16"])


def test_attention_backend_and_profile_are_passed_through(bench, capsys, monkeypatch):
    """``--sdpa math`` leaves only the math kernel enabled while a precision's model is built and timed, and is named
    in the header; ``--profile`` adds its section (on the CPU: the line saying there is nothing to profile)."""
    import torch

    enabled = []
    run = bench.bench_precision

    def recording(*args):
        enabled.append((torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.math_sdp_enabled()))
        return run(*args)

    monkeypatch.setattr(bench, "bench_precision", recording)
    assert bench.main(["--tiny", "--device", "cpu", "--steps", "1", "--batches", "1", "--precisions", "bf16",
                       "--repeats", "1", "--sdpa", "math", "--profile", "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert enabled == [(False, True)]
    assert torch.backends.cuda.flash_sdp_enabled()  # restored after the run
    assert "attention backend math" in out
    assert "fp32 (tiny), batch 1, one call profiled:\n(no GPU: nothing to profile)" in out
