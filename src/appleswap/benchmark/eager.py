"""Rows of ``appleswap bench`` for the eager model: the stock diffusers pass, the APPLE pass per attention backend, the
once-per-swap condition modulation and fused projections (A/B), swaps, one training step and the KV-cache mode."""

from __future__ import annotations

import torch

from appleswap.benchmark.models import apple_pass, make_inputs, plain_pass, student_pipeline
from appleswap.benchmark.utils import (
    Rows,
    count_flops,
    function_flops,
    relative_l2,
    sdpa_context,
    time_backends,
    time_call,
)


def bench_plain(cfg, flux, device, rows: Rows, ceiling: float, size: int) -> None:
    """The stock diffusers forward (before any adapter is attached) over the same token count."""
    inp = make_inputs(cfg, flux, 1, size)
    tokens = inp["x"].shape[1] * 2 + inp["text"].prompt_embeds.shape[1]
    with torch.no_grad():
        flops = count_flops(lambda: plain_pass(flux, inp))
        times = time_backends(lambda: plain_pass(flux, inp), device, cfg.repeats)
    best = min(times, key=times.get)
    rows.add("plain diffusers FLUX pass", times[best] * 1e3, "ms",
             f"{tokens} tokens, SDPA {best}, {flops / times[best] / ceiling:.2f} of ceiling")



def bench_passes(cfg, flux, model, device, rows: Rows, ceiling: float, size: int) -> str:
    """Per-pass rows of the three-branch forward for each SDPA backend; returns the fastest backend's name."""
    inp = make_inputs(cfg, flux, 1, size)
    tokens = inp["x"].shape[1] * 2 + inp["text"].prompt_embeds.shape[1]
    with torch.no_grad():
        flops = count_flops(lambda: apple_pass(model, inp))
        rows.add("FLOPs per APPLE pass", flops / 1e12, "TFLOP", f"{tokens} tokens, FlopCounterMode")
        times = time_backends(lambda: apple_pass(model, inp), device, cfg.repeats)
        for name, seconds in times.items():
            rows.add(f"APPLE pass, SDPA {name}", seconds * 1e3, "ms", f"{flops / seconds / ceiling:.2f} of ceiling")
        best = min(times, key=times.get)
        batch3 = make_inputs(cfg, flux, 3, size)
        with sdpa_context(best):
            seconds = time_call(lambda: apple_pass(model, batch3), device, cfg.repeats)
        rows.add("APPLE pass, batch 3 (both guidances batched)", seconds * 1e3, "ms",
                 f"vs 3 separate passes {3 * times[best] * 1e3:.1f} ms; {3 * flops / seconds / ceiling:.2f} of ceiling")
    return best



def bench_modulation(cfg, model, inp, device, rows: Rows, ceiling: float, backend: str) -> None:
    """Interleaved A/B (two rounds) of the plain pass and the pass with once-per-swap condition modulation."""
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



def bench_fused_eager(cfg, model, inp, device, rows: Rows, ceiling: float, backend: str) -> None:
    """Fuse the projections (kept for every later row) and A/B them against the separate layers, two rounds."""
    with torch.no_grad(), sdpa_context(backend):
        modulation = model.condition_modulation(inp["text"])
        flops = function_flops(model, lambda: apple_pass(model, inp, modulation))
        reference = apple_pass(model, inp, modulation).float()
        separate = [time_call(lambda: apple_pass(model, inp, modulation), device, cfg.repeats)]
        model.fuse_projections()
        fused = [time_call(lambda: apple_pass(model, inp, modulation), device, cfg.repeats)]
        difference = relative_l2(apple_pass(model, inp, modulation), reference)
        model.unfuse_projections()
        separate.append(time_call(lambda: apple_pass(model, inp, modulation), device, cfg.repeats))
        model.fuse_projections()
        fused.append(time_call(lambda: apple_pass(model, inp, modulation), device, cfg.repeats))
    rows.add("APPLE pass, eager, modulation once per swap, separate projections", min(separate) * 1e3, "ms",
             f"rounds {', '.join(f'{s * 1e3:.1f}' for s in separate)}; {flops / min(separate) / ceiling:.2f} of ceiling")
    rows.add("APPLE pass, eager, modulation once per swap, fused projections", min(fused) * 1e3, "ms",
             f"rounds {', '.join(f'{s * 1e3:.1f}' for s in fused)}; {flops / min(fused) / ceiling:.2f} of ceiling; "
             f"rel. L2 diff to separate {difference:.2g}")



def bench_student(cfg, model, vae, device, rows: Rows, size: int, backend: str, label: str, **kwargs) -> None:
    """One student swap end to end (VAE encode + sampling + decode), e.g. compiled or in KV-cache mode."""
    inp = make_inputs(cfg, model.flux if hasattr(model, "flux") else model._orig_mod.flux, 1, size)
    pipe, target = student_pipeline(model, vae, inp), torch.rand(1, 3, size, size, device=device)
    with sdpa_context(backend, fallback=True):
        seconds = time_call(lambda: pipe(inp["id_tokens"], target, num_steps=cfg.steps, output_type="pt",
                                         **kwargs), device, max(1, cfg.repeats // 2))
    rows.add(f"student swap ({cfg.steps} passes), {label}", seconds, "s", f"SDPA {backend}, incl. VAE")



def bench_swaps(cfg, model, vae, device, rows: Rows, size: int, backend: str) -> None:
    """End-to-end swaps through SwapPipeline (VAE encode + sampling + decode)."""
    inp = make_inputs(cfg, model.flux, 1, size)
    pipe = student_pipeline(model, vae, inp)
    target = torch.rand(1, 3, size, size, device=device)
    ids = inp["id_tokens"][:1]
    bench_student(cfg, model, vae, device, rows, size, backend, "eager")
    with sdpa_context(backend, fallback=True):
        pipe.mode = "teacher"
        seconds = time_call(lambda: pipe(ids, target, condition=target, invert=True, num_steps=cfg.steps,
                                         output_type="pt"), device, max(1, cfg.repeats // 2))
        rows.add(f"teacher swap + inversion ({2 * cfg.steps} passes)", seconds, "s", f"SDPA {backend}")
        pipe.mode = "student"
        targets = target.expand(cfg.batch, -1, -1, -1)
        seconds = time_call(lambda: pipe(ids, targets, num_steps=cfg.steps, output_type="pt"), device, 1)
        rows.add(f"student swaps, batch {cfg.batch}", cfg.batch / seconds, "images/s", f"{seconds:.2f} s per batch")



def bench_train(cfg, model, device, rows: Rows, size: int) -> None:
    """One LoRA training step (flow-matching loss, gradient checkpointing, AdamW) and its peak memory."""
    params = model.lora_parameters()
    for param in params:
        param.requires_grad_(True)
    model.enable_gradient_checkpointing()
    optimizer = torch.optim.AdamW(params, lr=1e-4)
    inp = make_inputs(cfg, model.flux, 1, size)
    target = torch.randn_like(inp["x"])
    backend = "flash" if torch.device(device).type == "cuda" else "auto"  # cuDNN backward trap (gpu_notes)

    def step():
        with sdpa_context(backend):  # recomputation in backward must use the same kernel
            loss = torch.nn.functional.mse_loss(apple_pass(model, inp).float(), target.float())
            loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    seconds = time_call(step, device, max(1, cfg.repeats // 2))
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if torch.device(device).type == "cuda" else float("nan")
    trainable = sum(p.numel() for p in params)
    rows.add(f"LoRA training step (r{cfg.lora_rank}, checkpointing)", seconds, "s",
             f"{trainable / 1e6:.1f} M trainable, SDPA {backend}")
    rows.add("training step peak memory", peak, "GiB", "max_memory_allocated")
    model.gradient_checkpointing = False
    for param in params:
        param.requires_grad_(False)



def bench_kv_cache(cfg, model, device, rows: Rows, ceiling: float, size: int, backend: str) -> None:
    """Independent-condition mode: condition keys/values once per swap, then 1536-token passes."""
    inp = make_inputs(cfg, model.flux, 1, size)
    with torch.no_grad(), sdpa_context(backend):
        build = time_call(lambda: model.build_condition_cache(inp["cond"], inp["text"], inp["ids"]), device,
                          cfg.repeats)
        cache = model.build_condition_cache(inp["cond"], inp["text"], inp["ids"])
        run = lambda: model(inp["x"], inp["t"], text=inp["text"], img_ids=inp["ids"],
                            id_tokens=inp["id_tokens"], guidance=inp["g"], condition_cache=cache)
        flops = function_flops(model, run)
        seconds = time_call(run, device, cfg.repeats)
    rows.add("KV-cache mode: condition pass (once per swap)", build * 1e3, "ms", "independent condition")
    rows.add("KV-cache mode: APPLE pass", seconds * 1e3, "ms",
             f"{flops / 1e12:.1f} TFLOP, {flops / seconds / ceiling:.2f} of ceiling (not the paper's model)")
