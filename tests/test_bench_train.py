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
    lines = [line for line in text.splitlines() if line.startswith("| ") and not line.startswith("| step")]
    return [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]


def test_tiny_recipes_and_sweep_print_their_rows(bench, capsys):
    """The worst case opens both gates for every sample; the paper recipe with partial checkpointing runs and
    sweeps on; each row's samples/s is its batch over its seconds."""
    assert bench.main(["--tiny", "--device", "cpu", "--recipes", "worst,partial", "--batch", "2", "--repeats", "1",
                       "--warmup", "0", "--sweep", "--batches", "3", "--log-level", "WARNING"]) == 0
    out = capsys.readouterr().out
    assert "tiny config" in out and "LoRA r64" in out and "ID loss (arcface 1,1,1,1) + LPIPS-VGG" in out
    rows = _table_rows(out)
    assert [(row[0], row[1]) for row in rows] == [
        ("APPLE, ID + LPIPS on every sample (worst case)", "2"),
        ("+ checkpointing on 50% of the blocks", "2"), ("+ checkpointing on 50% of the blocks", "3")]
    for _, batch, seconds, samples, *_ in rows:
        # the table prints 3 decimals: compare within that rounding
        assert float(seconds) > 0 and math.isclose(float(samples), int(batch) / float(seconds), rel_tol=0.01,
                                                   abs_tol=0.0006)
    worst_note = rows[0][-1]
    assert worst_note.startswith("100% of samples through ID + LPIPS")
    values = dict(part.strip().split(" ")[-2:] for part in worst_note.split("last loss ")[1].split(","))
    assert all(math.isfinite(float(values[k])) and float(values[k]) > 0 for k in ("fm", "id", "lpips"))
    assert "largest batch that fit: 3 (no OOM in the sweep)" in out


def test_all_gated_opens_the_gates_of_every_row(bench, capsys):
    """``--all-gated`` sends every sample of a paper-recipe row through ID + LPIPS (the worst-case peak); without
    it the same row gates by t (the default settings)."""
    assert bench.main(["--tiny", "--device", "cpu", "--recipes", "paper", "--batch", "2", "--repeats", "1",
                       "--warmup", "0", "--all-gated", "--log-level", "WARNING"]) == 0
    (row,) = _table_rows(capsys.readouterr().out)
    assert row[0].startswith("APPLE paper recipe") and row[-1].startswith("100% of samples through ID + LPIPS")
    paper, gated = bench.loss_settings("paper", False), bench.loss_settings("paper", True)
    assert (paper.id_loss_max_t, paper.lpips_max_t) == (0.35, 0.35) and not paper.recompute_aux_losses
    assert (gated.id_loss_max_t, gated.lpips_max_t) == (1.0, 1.0)
    assert bench.loss_settings("fp8recompute", False).recompute_aux_losses
    assert not bench.loss_settings("fp8budget", True).recompute_aux_losses


def test_paper_batches_draw_the_dataset_dropouts(bench):
    """The benchmark's batches drop text / condition / ID as the dataset does (about 10 % each over many)."""
    batches = [bench.paper_batch(8, 16, 4, start) for start in range(0, 400, 8)]
    text = torch.cat([b["drop_text"] for b in batches]).float().mean()
    condition = torch.cat([(b["condition"].flatten(1).abs().sum(1) == 0) for b in batches]).float().mean()
    identity = torch.cat([(b["id_tokens"].flatten(1).abs().sum(1) == 0) for b in batches]).float().mean()
    for share in (text, condition, identity):
        assert 0.05 < float(share) < 0.15, (text, condition, identity)


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
    assert "| 8 | OOM | - | - | - | - | out of memory |" in table
    assert "| 4 | 2.000 | 2.000 | - | - | 14.00 |" in table


def test_batch_sizes_and_time_budget(bench):
    assert bench.batch_sizes(None, 20) == [1, 2, 4, 8, 12, 16, 20]
    assert bench.batch_sizes("3,5", 64) == [3, 5]
    with pytest.raises(ValueError, match="--batches"):
        bench.batch_sizes("0,2", 64)
    rows = bench.sweep(lambda size: bench.BatchRow(size, 1.0, 1.0), [1, 2], lambda: None, deadline=0.0)
    assert len(rows) == 1 and rows[0].seconds is None and "not run" in rows[0].note
    assert bench.largest_fit(rows) == 0 and not bench.ran_out_of_memory(rows)


def test_fp8_rows_compare_their_losses_with_the_bf16_reference_row(bench):
    """The fp8 rows' loss difference is taken against the same recipe in bf16 ('compiled'), else the last
    paper-recipe row before them (never the worst case, whose gates change the trajectory); step by step."""
    assert bench.loss_reference(["plain", "paper", "compiled", "partial", "fp8", "fp8partial"]) == "compiled"
    assert bench.loss_reference(["worst", "paper", "fused", "fp8"]) == "fused"
    assert bench.loss_reference(["worst", "fp8"]) is None
    assert bench.loss_reference(["paper", "compiled"]) is None  # no fp8 row: nothing to compare
    mean, worst = bench.relative_loss_difference([1.1, 0.9, 2.0], [1.0, 1.0, 2.0])
    assert math.isclose(mean, 0.2 / 3) and math.isclose(worst, 0.1)
    note = bench.fp8_note([1.1, 0.8], "compiled", [1.0, 1.0])
    assert "'compiled' row" in note and "first step (the forward alone) rel. diff 1.00e-01" in note
    assert "over 2 steps (LoRAs updated apart) mean 1.50e-01, max 2.00e-01" in note
    assert "|" not in note  # a table cell
    assert "no bf16 reference row" in bench.fp8_note([1.0], None, None)


def test_fp8_row_quantises_the_model_and_notes_its_loss_difference(bench, capsys, monkeypatch):
    """The fp8 row (compile stubbed out: eager blocks, to keep this fast) quantises the frozen block linears, starts
    from the LoRA the paper row started from and runs its steps: the losses differ, by e4m3 rounding only."""
    import appleswap.speed
    from appleswap.speed.fp8_training import FrozenFp8Linear

    monkeypatch.setattr(appleswap.speed, "compile_block_functions",
                        lambda model, **_: appleswap.speed.uncompile_block_functions(model))
    built = []
    real_build = bench.build_parts
    monkeypatch.setattr(bench, "build_parts", lambda *a: built.append(real_build(*a)) or built[-1])
    assert bench.main(["--tiny", "--device", "cpu", "--recipes", "paper,fp8", "--batch", "2", "--repeats", "1",
                       "--warmup", "1", "--log-level", "WARNING"]) == 0
    rows = _table_rows(capsys.readouterr().out)
    assert [row[0] for row in rows] == ["APPLE paper recipe (t <= 0.35 gates, 10 % dropouts)",
                                        ("compiled + fp8 frozen base (e4m3 forward and input gradient), all blocks "
                                         "checkpointed")]
    note = rows[1][-1].split("fm loss vs the 'paper' row (same LoRA start, batches and seeds): ")[1]
    first = float(note.split("first step (the forward alone) rel. diff ")[1].split(";")[0])
    mean = float(note.split("over 2 steps (LoRAs updated apart) mean ")[1].split(",")[0])
    assert 0 < first < 0.05 and 0 < mean < 0.05, note
    model = built[0].transformer
    blocks = len(model.flux.transformer_blocks), len(model.flux.single_transformer_blocks)
    # per double block 12 linears besides the 2 AdaLN ones, per single block 5 besides 1 (tests/speed counts them)
    assert sum(isinstance(m, FrozenFp8Linear) for m in model.modules()) == 12 * blocks[0] + 5 * blocks[1]


def test_profile_kinds_name_the_kernels_a_training_step_runs(bench):
    """The profile's kinds, on kernel names as the CUDA profiler reports them on an H100."""
    assert bench.kernel_kind("void pytorch_flash::flash_bwd_dq_dk_dv_loop_seqk_parallel_kernel<...>") == "attention"
    assert bench.kernel_kind("sm90_xmma_gemm_e4m3bf16_e4m3f32_f32_tn_n_tilesize128x128x128") == "fp8 GEMM"
    assert bench.kernel_kind("nvjet_tst_256x128_64x4_2x1_v_bz_coopB_TNT") == "GEMM"
    assert bench.kernel_kind("triton_per_fused__to_copy_add_mul_native_layer_norm_0") == "inductor fused"
    assert bench.kernel_kind("void cudnn::cnn::conv2d_grouped_direct_kernel<...>") == "convolution"
    assert bench.kernel_kind("void at::native::(anonymous namespace)::fused_adamw_kernel<...>") == "optimizer"
    assert bench.kernel_kind("triton_poi_fused__to_copy_convert_element_type_mul_1") == "inductor fused"
    assert bench.kernel_kind("sm90_xmma_fprop_implicit_gemm_bf16bf16_bf16f32_f32_nhwckrsc_nhwc") == "convolution"
    assert bench.kernel_kind("void at::native::elementwise_kernel<128, 2, ...>") == "other"
