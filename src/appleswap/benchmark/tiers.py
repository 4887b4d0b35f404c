"""Rows of ``appleswap bench`` for the memory and numerics tiers: fp8 block weights (speed, peak memory, difference to
the unquantised pass) and the offload tiers. fp8 quantises the model in place, so these rows run last."""

from __future__ import annotations

import logging

import torch

from appleswap.benchmark.models import apple_pass, make_inputs, student_pipeline
from appleswap.benchmark.swaps import _cuda, _peak, _peak_reset, swap_rows
from appleswap.benchmark.utils import Rows, function_flops, relative_l2, sdpa_context, sync, time_call
from appleswap.speed.fp8_linear import quantize_fp8

logger = logging.getLogger("appleswap.benchmark")


def fp8_ceiling(device, size: int) -> float:
    """FLOP/s of a size^3 ``torch._scaled_mm`` with row-wise scales (as the fp8 model), NaN where it does not run."""
    try:
        a, sa = quantize_fp8(torch.randn(size, size, device=device), granularity="row")
        b, sb = quantize_fp8(torch.randn(size, size, device=device), granularity="row")
        sa, sb = sa.reshape(-1, 1).float(), sb.reshape(1, -1).float()
        seconds = time_call(lambda: torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, out_dtype=torch.bfloat16),
                            device, repeats=10, warmup=3)
    except (RuntimeError, NotImplementedError) as error:
        logger.warning("fp8 matmul unavailable: %s", str(error)[:120])
        return float("nan")
    return 2 * size**3 / seconds



def bench_fp8(cfg, model, vae, inp, device, rows: Rows, ceilings: tuple[float, float], size: int,
              backend: str) -> None:
    """Quantise the model's blocks to fp8 in place, then pass, swaps, peak memory and the output difference."""
    bf16_ceiling, fp8_ceil = ceilings
    with torch.no_grad(), sdpa_context(backend):
        modulation = model.condition_modulation(inp["text"])
        reference = apple_pass(model, inp, modulation).float()
        flops = function_flops(model, lambda: apple_pass(model, inp, modulation))
    model.uncompile_blocks()
    layers = model.quantize_fp8(device=device)
    _peak_reset(device)
    weights = torch.cuda.memory_allocated(device) / 2**30 if _cuda(device) else float("nan")
    rows.add("fp8: weights in memory", weights, "GiB",
             f"{layers} block linears e4m3, row-wise scales, fast accumulation; LoRA, ID-CA bf16")
    with torch.no_grad(), sdpa_context(backend):
        modulation = model.condition_modulation(inp["text"])
        seconds = time_call(lambda: apple_pass(model, inp, modulation), device, cfg.repeats)
        out = apple_pass(model, inp, modulation).float()
    error = relative_l2(out, reference)
    rows.add("fp8: APPLE pass, separate layers", seconds * 1e3, "ms",
             f"{flops / seconds / bf16_ceiling:.2f} of bf16 ceiling, {flops / seconds / fp8_ceil:.2f} of fp8 ceiling; "
             f"rel. L2 diff to unquantised {error:.3g}")
    model.fuse_projections()  # as the pipeline runs fp8: stacked fp8 GEMMs, merged condition weights
    with torch.no_grad(), sdpa_context(backend):
        seconds = time_call(lambda: apple_pass(model, inp, modulation), device, cfg.repeats)
        out = apple_pass(model, inp, modulation).float()
    error = relative_l2(out, reference)
    rows.add("fp8: APPLE pass, fused + merged condition weights", seconds * 1e3, "ms",
             f"{flops / seconds / bf16_ceiling:.2f} of bf16 ceiling; rel. L2 diff to unquantised {error:.3g}")
    if cfg.eager_swaps:
        with torch.compiler.set_stance("force_eager"):  # the VAE too, if the compiled rows compiled it
            swap_rows(cfg, model, vae, inp, device, size, backend, "fp8, eager", rows)
    rows.add("fp8: inference peak memory", _peak(device), "GiB", "fp8 passes and swaps")
    if cfg.compile:
        from appleswap.benchmark.compiled import bench_compiled

        bench_compiled(cfg, model, vae, device, rows, bf16_ceiling, size, "auto" if cfg.sdpa == "fastest" else
                       cfg.sdpa, label="fp8")
        model.uncompile_blocks()



def bench_offload(cfg, model, vae, inp, device, rows: Rows, size: int, backend: str, label: str) -> None:
    """Model tier (VAE in host memory between uses), then sequential block offload: pass, swap, peak memory."""
    pipe, target = student_pipeline(model, vae, inp), torch.rand(1, 3, size, size, device=device)
    pipe.offload, pipe.compute_device = "model", torch.device(device)
    vae.to("cpu")
    _peak_reset(device)
    with sdpa_context(backend, fallback=True):
        seconds = time_call(lambda: pipe(inp["id_tokens"], target, num_steps=cfg.steps, output_type="pt"), device, 1)
    rows.add(f"offload=model: student swap, {label}", seconds, "s", f"peak {_peak(device):.2f} GiB")
    model.enable_sequential_offload(device)
    _peak_reset(device)
    with torch.no_grad(), sdpa_context(backend):
        modulation = model.condition_modulation(inp["text"])
        seconds = time_call(lambda: apple_pass(model, inp, modulation), device, 2)
    rows.add(f"offload=sequential: APPLE pass, {label}", seconds * 1e3, "ms", "pinned host blocks, prefetch 1")
    if cfg.steps <= 8 or _cuda(device):
        with sdpa_context(backend, fallback=True):
            seconds = time_call(lambda: pipe(inp["id_tokens"], target, num_steps=cfg.steps, output_type="pt"),
                                device, 1, warmup=0)
        rows.add(f"offload=sequential: student swap, {label}", seconds, "s", "VAE offloaded too")
    rows.add(f"offload=sequential: peak memory, {label}", _peak(device), "GiB", "max_memory_allocated")
    model.disable_sequential_offload()
    vae.to(device)
    sync(device)



def run_tiers(cfg, model, vae, device, rows: Rows, ceiling: float, size: int, backend: str) -> None:
    """The memory/numerics rows in a safe order (fp8 eager and compiled, then the offload tiers: eager, as the
    pipeline runs its VAE with offload)."""
    inp = make_inputs(cfg, model.flux, 1, size)
    if cfg.fp8:
        fp8_ceil = fp8_ceiling(device, 256 if cfg.tiny else 8192)
        rows.add("fp8 matmul ceiling (torch._scaled_mm)", fp8_ceil / 1e12, "TFLOP/s", "row-wise scales, random data")
        bench_fp8(cfg, model, vae, inp, device, rows, (ceiling, fp8_ceil), size, backend)
    if cfg.offload:
        with torch.compiler.set_stance("force_eager"):  # a VAE compiled by the compiled rows runs eager here
            bench_offload(cfg, model, vae, inp, device, rows, size, backend, "fp8" if cfg.fp8 else "bf16")
