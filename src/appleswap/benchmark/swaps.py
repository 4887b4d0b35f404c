"""End-to-end swap rows shared by the compiled and the fp8 / offload tiers: student, teacher and batched swaps, and
where a compiled swap's time goes (VAE, sampling loop, decode)."""

from __future__ import annotations

import torch

from appleswap.benchmark.models import student_pipeline
from appleswap.benchmark.utils import Rows, sdpa_context, time_call
from appleswap.model.latents import decode_tokens, image_ids, prepare_noise, vae_scale_factor
from appleswap.sampling.samplers import sample_euler


def _cuda(device) -> bool:
    return torch.device(device).type == "cuda"



def _peak_reset(device) -> None:
    if _cuda(device):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)



def _peak(device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2**30 if _cuda(device) else float("nan")



def swap_rows(cfg, model, vae, inp, device, size: int, backend: str, label: str, rows: Rows, teacher: bool = True,
              batch: int = 1) -> None:
    """Student swap, teacher swap with inversion and (``batch`` > 1) batched student swaps, end to end."""
    pipe, target = student_pipeline(model, vae, inp), torch.rand(1, 3, size, size, device=device)
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
    pipe, target = student_pipeline(model, vae, inp), torch.rand(1, 3, size, size, device=device)
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
                 "denoiser set-up": lambda: pipe.denoiser(cond, ids, positions, steps=pipe.passes.step_table(sigmas)),
                 "loop": lambda: sample_euler(pipe.denoiser(cond, ids, positions, steps=pipe.passes.step_table(sigmas)),
                                              noise, sigmas),
                 "VAE decode": lambda: decode_tokens(vae, noise, size, size)}
        with pipe._vae():
            times = {name: time_call(fn, device, repeats) for name, fn in parts.items()}
    rest = times["swap"] - times["VAE encode"] - times["loop"] - times["VAE decode"]
    rows.add(f"student swap breakdown, {label}", times["swap"], "s",
             f"VAE encode {times['VAE encode'] * 1e3:.1f} ms, denoiser set-up {times['denoiser set-up'] * 1e3:.1f} ms,"
             f" {cfg.steps}-step loop {times['loop']:.3f} s ({times['loop'] / cfg.steps * 1e3:.1f} ms/step incl. "
             f"set-up), VAE decode {times['VAE decode'] * 1e3:.1f} ms, rest {rest * 1e3:.1f} ms")
