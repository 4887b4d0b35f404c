"""Rows of ``appleswap bench`` for the issue-6 options: once-per-swap condition modulation (A/B against the plain
path), fp8 block weights (speed, peak memory, numerical difference) and the offload tiers (peak memory, speed).

The fp8 rows quantise the benchmark model in place, so they run after every bf16 row; the sequential-offload
rows run last (on the fp8 model when ``--fp8``).
"""

from __future__ import annotations

import logging

from appleswap.bench import apple_pass
from appleswap.bench_utils import Rows, function_flops, relative_l2, sdpa_context, sync, time_call

logger = logging.getLogger("appleswap.bench")


def _cuda(device) -> bool:
    import torch

    return torch.device(device).type == "cuda"


def _peak_reset(device) -> None:
    import torch

    if _cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak(device) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if _cuda(device) else float("nan")



def bench_modulation(cfg, model, inp, device, rows: Rows, ceiling: float, backend: str) -> None:
    """Interleaved A/B (two rounds) of the plain pass and the pass with once-per-swap condition modulation."""
    import torch

    with torch.no_grad(), sdpa_context(backend):
        modulation = model.condition_modulation(inp["text"])
        flops = function_flops(model, lambda: apple_pass(model, inp, modulation))
        plain, cached = [], []
        for _ in range(2):
            plain.append(time_call(lambda: apple_pass(model, inp), device, cfg.repeats))
            cached.append(time_call(lambda: apple_pass(model, inp, modulation), device, cfg.repeats))
        difference = (apple_pass(model, inp, modulation).float() - apple_pass(model, inp).float()).abs().max().item()
    rows.add("APPLE pass, plain path (A/B)", min(plain) * 1e3, "ms",
             f"rounds {', '.join(f'{p * 1e3:.1f}' for p in plain)}")
    rows.add("APPLE pass, condition modulation once per swap", min(cached) * 1e3, "ms",
             f"rounds {', '.join(f'{c * 1e3:.1f}' for c in cached)}; {flops / min(cached) / ceiling:.2f} of ceiling; "
             f"max |diff| {difference:.2g}")


def fp8_ceiling(device, size: int) -> float:
    """FLOP/s of a size^3 ``torch._scaled_mm`` with row-wise scales (as the fp8 model), NaN where it does not run."""
    import torch

    from appleswap.model.fp8 import quantize_fp8

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


def swap_rows(cfg, model, vae, inp, device, size: int, backend: str, label: str, rows: Rows, teacher: bool = True,
              batch: int = 1) -> None:
    """Student swap, teacher swap with inversion and (``batch`` > 1) batched student swaps, end to end."""
    import torch

    from appleswap.bench import _pipe

    pipe, target = _pipe(model, vae, inp), torch.rand(1, 3, size, size, device=device)
    student, inverted = [], []
    with sdpa_context(backend, fallback=True):
        seconds = time_call(lambda: pipe(inp["id_tokens"], target, num_steps=cfg.steps, output_type="pt"), device,
                            cfg.repeats, samples=student)
        rows.add(f"student swap ({cfg.steps} passes), {label}", seconds, "s",
                 f"SDPA {backend}, incl. VAE; median of {_spread(student)}")
        if teacher:
            pipe.mode = "teacher"
            seconds = time_call(lambda: pipe(inp["id_tokens"], target, condition=target, invert=True,
                                             num_steps=cfg.steps, output_type="pt"), device, cfg.repeats,
                                samples=inverted)
            rows.add(f"teacher swap + inversion ({2 * cfg.steps} passes), {label}", seconds, "s",
                     f"SDPA {backend}; median of {_spread(inverted)}")
            pipe.mode = "student"
        if batch > 1:
            targets = target.expand(batch, -1, -1, -1)
            seconds = time_call(lambda: pipe(inp["id_tokens"][:1], targets, num_steps=cfg.steps, output_type="pt"),
                                device, 1)
            rows.add(f"student swaps, batch {batch}, {label}", batch / seconds, "images/s",
                     f"{seconds:.2f} s per batch")


def _spread(seconds: list[float]) -> str:
    return f"{len(seconds)} ({', '.join(f'{s:.3f}' for s in seconds)} s)"


def swap_breakdown(cfg, model, vae, inp, device, size: int, backend: str, label: str, rows: Rows) -> None:
    """Where a student swap's time goes: each stage timed alone (device synchronised) against the whole swap."""
    import torch

    from appleswap.bench import _pipe
    from appleswap.model.latents import decode_tokens, image_ids, prepare_noise, vae_scale_factor
    from appleswap.sampling.samplers import sample_euler

    pipe, target = _pipe(model, vae, inp), torch.rand(1, 3, size, size, device=device)
    scale = vae_scale_factor(vae)
    positions = image_ids(size, size, device=device, vae_scale=scale)
    sigmas = pipe.schedule(cfg.steps, positions.shape[0]).to(device)
    ids = inp["id_tokens"][:1]
    repeats = cfg.repeats
    with torch.no_grad(), sdpa_context(backend, fallback=True):
        cond = pipe.encode_latents(target, sample=True, seeds=[0])
        noise = prepare_noise(1, size, size, vae_scale=scale, dtype=model.dtype).to(device)
        parts = {"swap": lambda: pipe(ids, target, num_steps=cfg.steps, output_type="pt"),
                 "VAE encode": lambda: pipe.encode_latents(target, sample=True, seeds=[0]),
                 "denoiser set-up": lambda: pipe.denoiser(cond, ids, positions, steps=pipe.step_table(sigmas)),
                 "loop": lambda: sample_euler(pipe.denoiser(cond, ids, positions, steps=pipe.step_table(sigmas)),
                                              noise, sigmas),
                 "VAE decode": lambda: decode_tokens(vae, noise, size, size)}
        with pipe._vae():
            times = {name: time_call(fn, device, repeats) for name, fn in parts.items()}
    rest = times["swap"] - times["VAE encode"] - times["loop"] - times["VAE decode"]
    rows.add(f"student swap breakdown, {label}", times["swap"], "s",
             f"VAE encode {times['VAE encode'] * 1e3:.1f} ms, denoiser set-up {times['denoiser set-up'] * 1e3:.1f} ms,"
             f" {cfg.steps}-step loop {times['loop']:.3f} s ({times['loop'] / cfg.steps * 1e3:.1f} ms/step incl. "
             f"set-up), VAE decode {times['VAE decode'] * 1e3:.1f} ms, rest {rest * 1e3:.1f} ms")


def bench_fp8(cfg, model, vae, inp, device, rows: Rows, ceilings: tuple[float, float], size: int,
              backend: str) -> None:
    """Quantise the model's blocks to fp8 in place, then pass, swaps, peak memory and the output difference."""
    import torch

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
        from appleswap.bench_speed import bench_compiled

        bench_compiled(cfg, model, vae, device, rows, bf16_ceiling, size, "auto" if cfg.sdpa == "fastest" else
                       cfg.sdpa, label="fp8")
        model.uncompile_blocks()


def bench_offload(cfg, model, vae, inp, device, rows: Rows, size: int, backend: str, label: str) -> None:
    """Model tier (VAE in host memory between uses), then sequential block offload: pass, swap, peak memory."""
    import torch

    from appleswap.bench import _pipe

    pipe, target = _pipe(model, vae, inp), torch.rand(1, 3, size, size, device=device)
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
    import torch

    from appleswap.bench import make_inputs

    inp = make_inputs(cfg, model.flux, 1, size)
    if cfg.fp8:
        fp8_ceil = fp8_ceiling(device, 256 if cfg.tiny else 8192)
        rows.add("fp8 matmul ceiling (torch._scaled_mm)", fp8_ceil / 1e12, "TFLOP/s", "row-wise scales, random data")
        bench_fp8(cfg, model, vae, inp, device, rows, (ceiling, fp8_ceil), size, backend)
    if cfg.offload:
        with torch.compiler.set_stance("force_eager"):  # a VAE compiled by the compiled rows runs eager here
            bench_offload(cfg, model, vae, inp, device, rows, size, backend, "fp8" if cfg.fp8 else "bf16")
