"""``appleswap bench --tiny`` runs every row on the CPU and reports sane numbers."""

from __future__ import annotations

import math

import pytest

from appleswap.benchmark.settings import BenchConfig
from appleswap.benchmark.table import run_bench
from tests.fixtures.tiny_flux import one_thread  # noqa: F401


def test_tiny_bench_table():
    rows = run_bench(BenchConfig(tiny=True, steps=1, batch=2, repeats=1), "cpu")
    table = {name: value for name, value, _, _ in rows.rows}
    for name in ("matmul ceiling", "plain diffusers FLUX pass", "FLOPs per APPLE pass", "APPLE pass, SDPA auto",
                 "teacher swap + inversion (2 passes)", "student swaps, batch 2", "KV-cache mode: APPLE pass",
                 "LoRA training step (r64, checkpointing)", "APPLE pass, condition modulation once per swap",
                 "fp8: APPLE pass, separate layers", "fp8: APPLE pass, fused + merged condition weights",
                 "student swap (1 passes), fp8, eager",
                 "APPLE pass, eager, modulation once per swap, fused projections", "offload=sequential: APPLE pass, fp8",
                 "offload=sequential: student swap, fp8", "offload=model: student swap, fp8"):
        assert name in table and table[name] > 0, name
    # the KV-cache pass skips the condition tokens, so it counts fewer FLOPs than the full pass
    kv_note = next(note for name, _, _, note in rows.rows if name == "KV-cache mode: APPLE pass")
    assert "TFLOP" in kv_note and math.isfinite(table["APPLE pass, SDPA auto"])
    assert "| measure" in rows.table()
    # the optimised pass equals the plain one (fp32 tiny model); fp8 differs a little, not a lot
    notes = {name: note for name, _, _, note in rows.rows}
    assert float(notes["APPLE pass, condition modulation once per swap"].rsplit("max |diff| ", 1)[1]) < 1e-4
    fp8_diff = float(notes["fp8: APPLE pass, separate layers"].rsplit("unquantised ", 1)[1])
    fused_diff = float(notes["fp8: APPLE pass, fused + merged condition weights"].rsplit("unquantised ", 1)[1])
    assert 0 < fp8_diff < 0.1 and 0 < fused_diff < 0.1
    fused = notes["APPLE pass, eager, modulation once per swap, fused projections"]
    assert float(fused.rsplit("separate ", 1)[1]) < 1e-5


def test_tiny_bench_compiled_rows():
    """Regional compile rows (plain diffusers and APPLE, then compiled swaps) on the CPU with inductor."""
    import torch

    cfg = BenchConfig(tiny=True, steps=1, batch=1, repeats=1, compile=True, eager_swaps=False, train=False,
                      kv_cache=False, fp8=False, offload=False)
    try:
        rows = run_bench(cfg, "cpu")
    finally:
        torch._dynamo.reset()
    notes = {name: note for name, _, _, note in rows.rows}
    table = {name: value for name, value, _, _ in rows.rows}
    for name in ("plain diffusers FLUX pass, regional torch.compile (default)",
                 "APPLE pass, bf16, regional torch.compile (default)", "student swap (1 passes), bf16, compiled",
                 "teacher swap + inversion (2 passes), bf16, compiled", "VAE encode + decode (64x64)"):
        assert table[name] > 0, name
    compiled = notes["APPLE pass, bf16, regional torch.compile (default)"]
    assert float(compiled.split("eager ", 1)[1].split(";")[0]) < 1e-4
    # the folded-LoRA A/B computes the same pass; the breakdown's stages add up to no more than the swap
    folded = notes["APPLE pass, bf16, LoRA folded into the fused GEMMs (A/B)"]
    assert table["APPLE pass, bf16, LoRA apart (A/B)"] > 0 and float(folded.rsplit("apart ", 1)[1]) < 1e-4
    # the compiled swaps run a compiled copy of the VAE: the same round trip
    assert float(notes["VAE encode + decode (64x64)"].split("rel. L2 diff ", 1)[1].split(";")[0]) < 1e-4
    breakdown = notes["student swap breakdown, bf16, compiled"]
    assert "1-step loop" in breakdown and table["student swap breakdown, bf16, compiled"] > 0


def test_fraction_of_the_ceiling_counts_the_function_not_the_folded_columns():
    """The folded LoRA's zero columns are GPU work, not FLOPs of the function: the fractions must not count them."""
    import torch

    from appleswap.benchmark.models import apple_pass, build_apple, build_models, make_inputs
    from appleswap.benchmark.utils import count_flops, function_flops

    cfg = BenchConfig(tiny=True)
    flux, _ = build_models(cfg, "cpu", torch.float32)
    model = build_apple(flux, cfg, 64)
    inp = make_inputs(cfg, flux, 1, 64)
    with torch.no_grad():
        separate = count_flops(lambda: apple_pass(model, inp))
        model.fuse_projections()
        folded = count_flops(lambda: apple_pass(model, inp))
        assert folded > separate  # the zero columns do count as executed work
        assert function_flops(model, lambda: apple_pass(model, inp)) == separate
    assert model.is_fused() and model.fused_fold is True  # fusion restored as it was
    model.fuse_projections(fold_lora=False)
    with torch.no_grad():
        assert function_flops(model, lambda: apple_pass(model, inp)) == separate
    assert model.fused_fold is False


def test_module_entry_point_is_the_bench_command():
    """``python -m appleswap.benchmark`` parses the bench options itself (no ``bench bench`` in its usage)."""
    import subprocess
    import sys
    from pathlib import Path

    src = Path(__file__).resolve().parents[1] / "src"
    result = subprocess.run([sys.executable, "-m", "appleswap.benchmark", "--help"], capture_output=True, text=True,
                            env={"PYTHONPATH": str(src), "PATH": ""}, check=True)
    assert result.stdout.startswith("usage: python -m appleswap.benchmark")
    assert "bench bench" not in result.stdout and "--compile" in result.stdout and "--weights-dir" in result.stdout


@pytest.mark.slow  # inductor compiles the blocks and the VAE on the CPU: a few minutes on a shared 2-core box
def test_compiled_rows_script_runs_on_the_current_layout(capsys):
    """benchmarks/bench_compiled_rows.py (the before/after A/B of the redesign) finds this tree's benchmark functions
    and prints the compiled pass and swap rows."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_compiled_rows.py"
    spec = importlib.util.spec_from_file_location("bench_compiled_rows", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--tiny"]) == 0
    table = capsys.readouterr().out
    assert "APPLE pass, bf16, regional torch.compile" in table and "student swap (1 passes)" in table
