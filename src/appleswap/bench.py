"""``appleswap bench``: one table of GPU speed and memory for APPLE on the full FLUX.1 architecture.

Random weights, built directly on the device in bf16 (no downloads): the three-branch forward (512 text + 1024
image + 1024 condition tokens, 20 ID cross-attentions, r64 LoRA), the plain diffusers forward over the same
token count, student swap (28 passes), teacher swap with inversion (56 passes), batched images/s, one LoRA
training step (gradient checkpointing) with peak memory, FLOPs per pass and the fraction of a bf16 matmul
ceiling measured in the same run. ``--tiny --device cpu`` runs the same code on a tiny config.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from pathlib import Path
from typing import Literal

from appleswap.bench_utils import (
    Rows,
    count_flops,
    function_flops,
    init_random_,
    matmul_ceiling,
    sdpa_context,
    time_backends,
    time_call,
)
from appleswap.cli_common import BLAS_WORKSPACE_ENV, HelpFormatter, common_parser
from appleswap.config import option

logger = logging.getLogger(__name__)

FULL_FLUX = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                 "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}
TINY_FLUX = {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 16, "num_attention_heads": 2,
                 "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 4, 8)}
FULL_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}
TINY_VAE = {"block_out_channels": (32, 32), "layers_per_block": 1, "norm_num_groups": 8}


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    tiny: bool = option(False, "tiny config (CPU smoke test of the benchmark itself)")
    steps: int = option(28, "sampling steps of a swap")
    batch: int = option(4, "images per call for the batched images/s row", flag="batch-size")
    repeats: int = option(5, "timed repeats per row (median reported)")
    text_tokens: int = option(512, "T5 tokens (512 in APPLE)")
    sdpa: Literal["auto", "flash", "efficient", "cudnn", "math", "fastest"] = option(
        "fastest", "attention kernel for the swaps: a named backend, or the fastest in the per-pass rows")
    compile: bool = option(False, "also time regional torch.compile of the plain and the APPLE forward, and compiled "
                                  "swaps (and compiled fp8 with --fp8)")
    compile_mode: str = option("default", "torch.compile mode (default, reduce-overhead, max-autotune-no-cudagraphs)")
    eager_swaps: bool = option(True, "time eager student / teacher / batched swaps")
    cuda_graphs: bool = option(True, "compiled rows replay each pass as one CUDA graph (GPU only)")
    only_tiers: bool = option(False, "after the baseline passes, only the fp8 / offload tiers (no bf16 A/B, swaps, "
                                     "compile, training or KV rows): the second half of a table split over two runs")
    kv_cache: bool = option(True, "also time the independent-condition mode with its once-per-swap KV cache")
    train: bool = option(True, "time one LoRA training step (r64, gradient checkpointing)")
    lora_rank: int = option(64, "LoRA rank")
    fp8: bool = option(True, "also quantise the blocks to fp8 at the end and time pass, swaps and peak memory")
    offload: bool = option(True, "also time the offload tiers (model, sequential) and their peak memory")
    output: Path | None = option(None, "also write the table as JSON here", short="-o")


def build_models(cfg: BenchConfig, device, dtype):
    """(plain FLUX, VAE) with random weights, created on ``meta`` and materialised on the device."""
    import torch
    from diffusers import FluxTransformer2DModel

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # materialise directly in bf16 (no fp32 copy of 12 B parameters)
    try:
        with torch.device("meta"):
            flux = FluxTransformer2DModel(**(TINY_FLUX if cfg.tiny else FULL_FLUX))
    finally:
        torch.set_default_dtype(previous)
    flux = flux.to_empty(device=device)
    init_random_(flux)
    return flux.eval().requires_grad_(False), build_vae(cfg, device, dtype)


def build_vae(cfg: BenchConfig, device, dtype):
    """The FLUX VAE (16 latent channels, shift and scale) with diffusers' random initialisation."""
    from diffusers import AutoencoderKL

    vae_extra = TINY_VAE if cfg.tiny else FULL_VAE
    blocks = len(vae_extra["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) *
                        blocks, up_block_types=("UpDecoderBlock2D",) * blocks, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, **vae_extra)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)


def build_apple(flux, cfg: BenchConfig, id_dim: int):
    """The APPLE transformer around ``flux``: 20 ID cross-attentions (random) and a fresh rank-r LoRA."""
    from appleswap.model.id_attention import build_id_attentions, id_attention_layout
    from appleswap.model.transformer import AppleTransformer

    doubles, singles = id_attention_layout(len(flux.transformer_blocks), len(flux.single_transformer_blocks))
    heads, head_dim = (2, 16) if cfg.tiny else (16, 128)  # PuLID: 16 x 128 = 2048 inner
    attentions = build_id_attentions(len(doubles) + len(singles), flux.inner_dim, id_dim, heads, head_dim)
    attentions = attentions.to(device=flux.device, dtype=flux.dtype)
    init_random_(attentions, seed=1)
    model = AppleTransformer(flux, attentions)
    model.add_lora(rank=cfg.lora_rank, init="gaussian")
    model.flux.to(device=flux.device, dtype=flux.dtype)
    return model.eval().requires_grad_(False)


def make_inputs(cfg: BenchConfig, flux, batch: int, size: int):
    """Random latents, condition, text and ID tokens for ``batch`` images of ``size`` pixels."""
    import torch

    from appleswap.model.latents import image_ids
    from appleswap.model.transformer import TextEmbeddings

    device, dtype = flux.device, flux.dtype
    scale = 2 if cfg.tiny else 8
    ids = image_ids(size, size, device=device, vae_scale=scale)
    length = ids.shape[0]
    text_len = 8 if cfg.tiny else cfg.text_tokens
    text = TextEmbeddings(torch.randn(1, text_len, flux.config.joint_attention_dim, device=device, dtype=dtype),
                          torch.randn(1, flux.config.pooled_projection_dim, device=device, dtype=dtype),
                          torch.zeros(text_len, 3, device=device))
    x, cond = (torch.randn(batch, length, 64, device=device, dtype=dtype) for _ in range(2))
    id_tokens = torch.randn(batch, 32, 64 if cfg.tiny else 2048, device=device, dtype=dtype)
    return {"x": x, "cond": cond, "text": text, "ids": ids, "id_tokens": id_tokens,
                "t": torch.full((batch,), 0.7, device=device), "g": torch.ones(batch, device=device)}


def apple_pass(model, inp, modulation=None, timestep_rows=None, constants=None):
    return model(inp["x"], inp["t"], text=inp["text"], img_ids=inp["ids"], condition=inp["cond"],
                 id_tokens=None if constants is not None else inp["id_tokens"], guidance=inp["g"],
                 modulation=modulation, timestep_modulation=timestep_rows, constants=constants)


def swap_constants(model, inp):
    """The pass's per-swap constants (prompt embedding, RoPE, ID keys/values) as a swap computes them."""
    return model.pass_constants(inp["text"], inp["ids"], inp["id_tokens"], condition=True)


def pass_timestep_rows(model, inp, modulation=None):
    """The main tokens' AdaLN rows of the benchmark pass's timestep, precomputed as a swap does (with the
    condition's ``modulation`` rows beside them, as a swap's step table holds them)."""
    rows = model.timestep_modulation(inp["t"][:1], inp["text"], float(inp["g"][0]))
    return (rows if modulation is None else model.joined_modulation(rows, modulation)).step(0)


def plain_pass(flux, inp):
    """Stock diffusers forward over the same tokens: [image; condition] as one image sequence."""
    import torch

    x = torch.cat([inp["x"], inp["cond"]], dim=1)
    return flux(hidden_states=x, encoder_hidden_states=inp["text"].prompt_embeds.expand(x.shape[0], -1, -1),
                pooled_projections=inp["text"].pooled.expand(x.shape[0], -1), timestep=inp["t"],
                img_ids=torch.cat([inp["ids"], inp["ids"]]), txt_ids=inp["text"].text_ids, guidance=inp["g"]).sample


def bench_plain(cfg, flux, device, rows: Rows, ceiling: float, size: int) -> None:
    """The stock diffusers forward (before any adapter is attached) over the same token count."""
    import torch

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
    import torch

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


def _pipe(model, vae, inp):
    from appleswap.pipeline import SwapPipeline

    return SwapPipeline(model, vae, inp["text"], "student", null_id=inp["id_tokens"][:1].clone())


def bench_student(cfg, model, vae, device, rows: Rows, size: int, backend: str, label: str, **kwargs) -> None:
    """One student swap end to end (VAE encode + sampling + decode), e.g. compiled or in KV-cache mode."""
    import torch

    inp = make_inputs(cfg, model.flux if hasattr(model, "flux") else model._orig_mod.flux, 1, size)
    pipe, target = _pipe(model, vae, inp), torch.rand(1, 3, size, size, device=device)
    with sdpa_context(backend, fallback=True):
        seconds = time_call(lambda: pipe(inp["id_tokens"], target, num_steps=cfg.steps, output_type="pt",
                                         **kwargs), device, max(1, cfg.repeats // 2))
    rows.add(f"student swap ({cfg.steps} passes), {label}", seconds, "s", f"SDPA {backend}, incl. VAE")


def bench_swaps(cfg, model, vae, device, rows: Rows, size: int, backend: str) -> None:
    """End-to-end swaps through SwapPipeline (VAE encode + sampling + decode)."""
    import torch

    inp = make_inputs(cfg, model.flux, 1, size)
    pipe = _pipe(model, vae, inp)
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
    import torch

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
    import torch

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


def environment(device) -> str:
    import diffusers
    import peft
    import torch

    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    workspace = os.environ.get(BLAS_WORKSPACE_ENV, "unset")
    return (f"{name}; torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}; "
            f"{BLAS_WORKSPACE_ENV}={workspace}")


def run_bench(cfg: BenchConfig, device: str) -> Rows:
    """Every row of the table, in order: baselines, eager rows, fused A/B, swaps, compiled rows, memory tiers."""
    import torch

    from appleswap.bench_speed import bench_fused_eager, bench_plain_compiled, bench_vae, compiled_rows
    from appleswap.bench_tiers import bench_modulation, run_tiers

    dtype = torch.float32 if cfg.tiny else torch.bfloat16
    size = 64 if cfg.tiny else 512
    if torch.device(device).type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    rows = Rows()
    ceiling = matmul_ceiling(device, dtype, 256 if cfg.tiny else 8192)
    rows.add("matmul ceiling", ceiling / 1e12, "TFLOP/s", f"{'256' if cfg.tiny else '8192'}^3 {dtype}, random data")
    flux, vae = build_models(cfg, device, dtype)
    rows.add("FLUX parameters", sum(p.numel() for p in flux.parameters()) / 1e9, "B", "random weights")
    bench_plain(cfg, flux, device, rows, ceiling, size)
    if cfg.only_tiers:
        cfg = dataclasses.replace(cfg, eager_swaps=False, train=False, kv_cache=False)
    if cfg.compile and not cfg.only_tiers:
        bench_plain_compiled(cfg, flux, device, rows, ceiling, size, "auto" if cfg.sdpa == "fastest" else cfg.sdpa)
    model = build_apple(flux, cfg, 64 if cfg.tiny else 2048)
    if torch.device(device).type == "cuda":
        rows.add("weights in memory", torch.cuda.memory_allocated(device) / 2**30, "GiB", "transformer + CA + LoRA + VAE")
        torch.cuda.reset_peak_memory_stats(device)
    backend = bench_passes(cfg, flux, model, device, rows, ceiling, size)
    chosen = backend if cfg.sdpa == "fastest" else cfg.sdpa
    inp = make_inputs(cfg, flux, 1, size)
    if not cfg.only_tiers:
        bench_modulation(cfg, model, inp, device, rows, ceiling, chosen)
        bench_fused_eager(cfg, model, inp, device, rows, ceiling, chosen)  # projections stay fused from here on
    if cfg.eager_swaps:
        bench_swaps(cfg, model, vae, device, rows, size, chosen)
    if torch.device(device).type == "cuda":
        rows.add("inference peak memory", torch.cuda.max_memory_allocated(device) / 2**30, "GiB", "bf16, swaps so far")
    if cfg.train:
        bench_train(cfg, model, device, rows, size)
    if cfg.kv_cache:
        bench_kv_cache(cfg, model, device, rows, ceiling, size, chosen)
        bench_student(cfg, model, vae, device, rows, size, chosen, "KV-cache mode", kv_cache=True)
    if cfg.compile and not cfg.only_tiers:
        bench_vae(cfg, vae, device, rows, size)  # compiles the VAE for the compiled rows
        compiled_rows(cfg, model, vae, device, rows, ceiling, size)
    run_tiers(cfg, model, vae, device, rows, ceiling, size, chosen)  # last: fp8 quantises the model in place
    return rows


def add_parser(subparsers) -> None:
    from appleswap.config import add_config_args

    parser = subparsers.add_parser("bench", parents=[common_parser()], formatter_class=HelpFormatter,
                                   help="GPU speed and memory table (random full-size weights)",
                                   description=__doc__ + "\nExample:\n  appleswap bench --compile --output bench.json")
    add_config_args(parser.add_argument_group("bench options"), BenchConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from appleswap.cli_common import inference_blas_defaults, pick_device
    from appleswap.config import load_config_file, resolve_config

    inference_blas_defaults()  # also under ``python -m appleswap.bench``, before any CUDA work
    cfg = resolve_config(BenchConfig, args, load_config_file(args.config))
    device = pick_device(args.device)
    rows = run_bench(cfg, device)
    header = f"appleswap bench on {environment(device)} ({'tiny' if cfg.tiny else 'full FLUX.1'} config)"
    print(header)
    print(rows.table())
    if cfg.output is not None:
        from appleswap.files import save_json

        save_json(cfg.output, {"environment": header, "rows": [list(r) for r in rows.rows]})
    return 0


def main(argv: list[str] | None = None) -> int:
    """``python -m appleswap.bench [options]``: the bench command without importing the other subcommands."""
    import sys

    from appleswap.cli_common import parse_command_line, setup_logging

    parser = argparse.ArgumentParser(prog="appleswap")  # the subcommand's usage then reads "appleswap bench"
    add_parser(parser.add_subparsers(dest="command"))
    args = parse_command_line(parser, ["bench", *(sys.argv[1:] if argv is None else argv)])
    setup_logging(args.log_level)
    return run(args)


if __name__ == "__main__":
    import sys

    sys.exit(main())
