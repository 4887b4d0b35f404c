"""``appleswap bench --tiny`` runs every row on the CPU and reports sane numbers."""

from __future__ import annotations

import math

from appleswap.bench import BenchConfig, run_bench
from tests.fixtures.tiny_flux import one_thread  # noqa: F401


def test_tiny_bench_table():
    rows = run_bench(BenchConfig(tiny=True, steps=1, batch=2, repeats=1), "cpu")
    table = {name: value for name, value, _, _ in rows.rows}
    for name in ("matmul ceiling", "plain diffusers FLUX pass", "FLOPs per APPLE pass", "APPLE pass, SDPA auto",
                 "teacher swap + inversion (2 passes)", "student swaps, batch 2", "KV-cache mode: APPLE pass",
                 "LoRA training step (r64, checkpointing)"):
        assert name in table and table[name] > 0, name
    # the KV-cache pass skips the condition tokens, so it counts fewer FLOPs than the full pass
    kv_note = next(note for name, _, _, note in rows.rows if name == "KV-cache mode: APPLE pass")
    assert "TFLOP" in kv_note and math.isfinite(table["APPLE pass, SDPA auto"])
    assert "| measure" in rows.table()
