"""The whole ``appleswap bench`` table in order: baselines, eager rows, swaps, training, KV cache, compiled rows, tiers."""

from __future__ import annotations

import dataclasses
import os

import diffusers
import peft
import torch

from appleswap.benchmark.compiled import bench_plain_compiled, bench_vae, compiled_rows
from appleswap.benchmark.eager import (
    bench_fused_eager,
    bench_kv_cache,
    bench_modulation,
    bench_passes,
    bench_plain,
    bench_student,
    bench_swaps,
    bench_train,
)
from appleswap.benchmark.models import BenchConfig, build_apple, build_models, make_inputs
from appleswap.benchmark.tiers import run_tiers
from appleswap.benchmark.utils import Rows, matmul_ceiling
from appleswap.cli_common import BLAS_WORKSPACE_ENV


def environment(device) -> str:
    name = torch.cuda.get_device_name(device) if torch.device(device).type == "cuda" else "cpu"
    workspace = os.environ.get(BLAS_WORKSPACE_ENV, "unset")
    return (f"{name}; torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}; "
            f"{BLAS_WORKSPACE_ENV}={workspace}")



def run_bench(cfg: BenchConfig, device: str) -> Rows:
    """Every row of the table, in order: baselines, eager rows, fused A/B, swaps, compiled rows, memory tiers."""
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
