"""Rows of ``appleswap bench`` for regional ``torch.compile``: the plain diffusers forward (the baseline at the same
compile scope), the APPLE forward with its per-swap constants, the folded-LoRA A/B, the VAE and compiled swaps."""

from __future__ import annotations

import time

import torch

from appleswap.benchmark.models import apple_pass, make_inputs, pass_timestep_rows, plain_pass, swap_constants
from appleswap.benchmark.swaps import swap_breakdown, swap_rows
from appleswap.benchmark.utils import Rows, count_flops, function_flops, relative_l2, sdpa_context, sync, time_call
from appleswap.model.latents import decode_tokens, encode_images, vae_conv_flags
from appleswap.speed import kernels
from appleswap.speed.vae import compile_vae, graph_vae_encoder


def bench_plain_compiled(cfg, flux, device, rows: Rows, ceiling: float, size: int, backend: str) -> None:
    """The stock forward with diffusers' own regional compilation (``compile_repeated_blocks``), then undone."""
    inp = make_inputs(cfg, flux, 1, size)
    with torch.no_grad():
        flops = count_flops(lambda: plain_pass(flux, inp))
    flux.compile_repeated_blocks(fullgraph=True, dynamic=False, mode=_mode(cfg))
    try:
        with torch.no_grad(), sdpa_context(backend, fallback=True):
            start = time.perf_counter()
            plain_pass(flux, inp)
            sync(device)
            compile_seconds = time.perf_counter() - start
            seconds = time_call(lambda: plain_pass(flux, inp), device, cfg.repeats, warmup=2)
    finally:
        for block in list(flux.transformer_blocks) + list(flux.single_transformer_blocks):
            block._compiled_call_impl = None  # the APPLE rows run the blocks' submodules, uncompiled
    rows.add(f"plain diffusers FLUX pass, regional torch.compile ({cfg.compile_mode})", seconds * 1e3, "ms",
             f"{flops / seconds / ceiling:.2f} of ceiling; compile {compile_seconds:.0f} s")



def _mode(cfg) -> str | None:
    return None if cfg.compile_mode == "default" else cfg.compile_mode



def bench_compiled(cfg, model, vae, device, rows: Rows, ceiling: float, size: int, backend: str,
                   label: str = "bf16") -> None:
    """Regional compile of the (fused) APPLE forward: compile time, pass, student / teacher swaps, batched swaps."""
    inp = make_inputs(cfg, model.flux, 1, size)
    with torch.no_grad():
        modulation = model.condition_modulation(inp["text"])
        steps = pass_timestep_rows(model, inp, modulation)
        constants = swap_constants(model, inp)  # FLOPs: the pass as swaps run it (0.08 % fewer than all in the pass)
        flops = function_flops(model, lambda: apple_pass(model, inp, modulation, steps, constants))
        reference = apple_pass(model, inp, modulation).float()
    model.compile_blocks(mode=_mode(cfg))
    if cfg.cuda_graphs and str(device).startswith("cuda"):
        model.enable_cuda_graphs()
        label += " + CUDA graph"
    with torch.no_grad(), sdpa_context(backend, fallback=True):
        start = time.perf_counter()
        out = apple_pass(model, inp, modulation, steps, constants).float()
        sync(device)
        compile_seconds = time.perf_counter() - start
        seconds = time_call(lambda: apple_pass(model, inp, modulation, steps, constants), device, cfg.repeats,
                            warmup=2)
        per_pass = time_call(lambda: apple_pass(model, inp, modulation), device, cfg.repeats, warmup=2)
    difference = relative_l2(out, reference)
    rows.add(f"APPLE pass, {label}, regional torch.compile ({cfg.compile_mode})", seconds * 1e3, "ms",
             f"{flops / seconds / ceiling:.2f} of ceiling; compile {compile_seconds:.0f} s; "
             f"rel. L2 diff to eager {difference:.2g}; timestep AdaLN rows, prompt embedding, RoPE and ID keys/values "
             f"precomputed per swap (as swaps run; all computed in the pass: {per_pass * 1e3:.1f} ms)")
    if model.is_fused():
        bench_fold_ab(cfg, model, inp, (modulation, steps, constants), device, rows, backend, label)
    graphs = cfg.cuda_graphs and str(device).startswith("cuda")
    graph_vae_encoder(vae, graphs)  # as the pipeline runs it with cuda_graphs=True
    swap_rows(cfg, model, vae, inp, device, size, backend, f"{label}, compiled", rows, batch=cfg.batch)
    swap_breakdown(cfg, model, vae, inp, device, size, backend, f"{label}, compiled", rows)
    model.enable_cuda_graphs(False)
    graph_vae_encoder(vae, False)



def bench_fold_ab(cfg, model, inp, modulations, device, rows: Rows, backend: str, label: str) -> None:
    """Interleaved A/B (two rounds) of the compiled pass with the LoRA as the pipeline runs it (bf16: folded into
    the fused GEMMs; fp8: merged condition weights) and apart (and, for fp8, folded and the separate layers), and
    without the Triton kernels (:mod:`appleswap.speed.kernels`: torch code, as inductor compiles it). Leaves the
    model fused as the pipeline runs it, with the kernels on."""
    fp8 = label.startswith("fp8")
    default = "merged condition weights" if fp8 else "LoRA folded into the fused GEMMs"
    names = {None: "separate layers (A/B)", False: "LoRA apart (A/B)", True: f"{default} (A/B)",
             "folded": "LoRA folded into the fused GEMMs (A/B)", "torch": f"{default}, no Triton kernels (A/B)"}
    variants = (None, False, "folded", True, "torch") if fp8 else (False, True, "torch")
    times = {variant: [] for variant in variants}
    outputs = {}
    with torch.no_grad(), sdpa_context(backend, fallback=True):
        for _ in range(2):
            for variant in variants:
                kernels.set_enabled(variant != "torch")
                if variant is None:
                    model.unfuse_projections()
                else:
                    model.fuse_projections(fold_lora=variant is not False, condition_weights=variant != "folded")
                times[variant].append(time_call(lambda: apple_pass(model, inp, *modulations), device, cfg.repeats,
                                                warmup=2))
                outputs[variant] = apple_pass(model, inp, *modulations).float()
        kernels.set_enabled(True)
        model.fuse_projections(fold_lora=True)
    difference = relative_l2(outputs[True], outputs[False])
    kernel_difference = relative_l2(outputs[True], outputs["torch"])
    for variant in variants:
        note = {True: f"; rel. L2 diff to the LoRA apart {difference:.2g}",
                "torch": f"; rel. L2 diff kernels vs torch code {kernel_difference:.2g}"}.get(variant, "")
        rows.add(f"APPLE pass, {label}, {names[variant]}", min(times[variant]) * 1e3, "ms",
                 f"rounds {', '.join(f'{t * 1e3:.1f}' for t in times[variant])}{note}")



def bench_vae(cfg, vae, device, rows: Rows, size: int) -> None:
    """VAE encode + decode of one image: default cuDNN settings, with cuDNN autotuning (the pipeline's eager VAE),
    autotuning with channels-last weights and activations, and with ``--compile`` compiled in place
    (:func:`~appleswap.speed.vae.compile_vae`, as the pipeline compiles it without offload; on any device, as
    the bench compiles the blocks). The compiled swap rows after this one use the compiled VAE."""
    image = torch.rand(1, 3, size, size, device=device)

    def round_trip(channels_last: bool = False):
        pixels = image.contiguous(memory_format=torch.channels_last) if channels_last else image
        return decode_tokens(vae, encode_images(vae, pixels), size, size)

    with torch.backends.cudnn.flags(enabled=True, benchmark=False):
        plain = time_call(round_trip, device, cfg.repeats, warmup=2)
    note = ""
    with vae_conv_flags():
        tuned = time_call(round_trip, device, cfg.repeats, warmup=2)
        vae.to(memory_format=torch.channels_last)
        try:
            last = time_call(lambda: round_trip(True), device, cfg.repeats, warmup=2)
        finally:
            vae.to(memory_format=torch.contiguous_format)
        if cfg.compile:
            reference = round_trip()
            compile_vae(vae)
            seconds = time_call(round_trip, device, cfg.repeats, warmup=2)
            difference = relative_l2(round_trip(), reference)
            note = f"; compiled {seconds * 1e3:.1f} ms (rel. L2 diff {difference:.2g}; the compiled swaps' VAE)"
    rows.add(f"VAE encode + decode ({size}x{size})", plain * 1e3, "ms",
             f"cuDNN autotuned {tuned * 1e3:.1f} ms (eager pipeline); + channels-last {last * 1e3:.1f} ms{note}")



def compiled_rows(cfg, model, vae, device, rows: Rows, ceiling: float, size: int) -> None:
    """The bf16 compiled rows and the peak memory after them. Attention: PyTorch's own backend priority (flash /
    cuDNN) unless ``--sdpa`` names one; the eager ranking is host-bound and noisy, and may pick the memory-efficient
    kernel, the slowest on Hopper once compiled."""
    bench_compiled(cfg, model, vae, device, rows, ceiling, size, "auto" if cfg.sdpa == "fastest" else cfg.sdpa)
    model.uncompile_blocks()
    if torch.device(device).type == "cuda":
        rows.add("inference peak memory, compiled", torch.cuda.max_memory_allocated(device) / 2**30, "GiB",
                 f"bf16, batch {cfg.batch} swaps included")
