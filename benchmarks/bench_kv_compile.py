"""Follow-up GPU run for ``appleswap bench``: kernel profile of the eager APPLE pass, then torch.compile of the
independent-condition (KV-cache) pass and a compiled KV-cache student swap.

    PYTHONPATH=src python benchmarks/bench_kv_compile.py [--tiny --device cpu]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from appleswap.bench import BenchConfig, apple_pass, bench_student, build_apple, build_models, make_inputs
from appleswap.bench_utils import Rows, count_flops, matmul_ceiling, sync, time_call


def profile_pass(model, inp, device, top: int = 15) -> str:
    """The eager pass's kernels, by total device time (one profiled pass after a warm-up)."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.startswith("cuda") else [])
    with torch.no_grad():
        apple_pass(model, inp)
        sync(device)
        with profile(activities=activities) as prof:
            apple_pass(model, inp)
            sync(device)
    key = "self_device_time_total" if device.startswith("cuda") else "self_cpu_time_total"
    return prof.key_averages().table(sort_by=key, row_limit=top, max_name_column_width=60)


def bench_teacher(cfg, model, vae, device, rows: Rows, size: int, label: str, **kwargs) -> None:
    """Teacher swap with attribute-aware inversion (2 x steps passes), end to end."""
    from appleswap.bench import _pipe

    inp = make_inputs(cfg, vae_free_flux(model), 1, size)
    pipe, target = _pipe(model, vae, inp), torch.rand(1, 3, size, size, device=device)
    pipe.mode = "teacher"
    seconds = time_call(lambda: pipe(inp["id_tokens"], target, condition=target, invert=True, num_steps=cfg.steps,
                                     output_type="pt", **kwargs), device, max(1, cfg.repeats // 2))
    rows.add(f"teacher swap + inversion ({2 * cfg.steps} passes), {label}", seconds, "s", "incl. VAE")


def vae_free_flux(model):
    return model.flux if hasattr(model, "flux") else model._orig_mod.flux


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--paper-mode", action="store_true", help="also compile and time the full joint attention")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = BenchConfig(tiny=args.tiny, repeats=args.repeats, steps=2 if args.tiny else 28)
    device, size = args.device, 64 if args.tiny else 512
    dtype = torch.float32 if args.tiny else torch.bfloat16
    rows = Rows()
    ceiling = matmul_ceiling(device, dtype, 256 if args.tiny else 8192)
    rows.add("matmul ceiling", ceiling / 1e12, "TFLOP/s", "")
    flux, vae = build_models(cfg, device, dtype)
    model = build_apple(flux, cfg, 64 if args.tiny else 2048)
    inp = make_inputs(cfg, flux, 1, size)
    print(profile_pass(model, inp, device), flush=True)
    with torch.no_grad():
        eager = time_call(lambda: apple_pass(model, inp), device, cfg.repeats)
    rows.add("APPLE pass, eager", eager * 1e3, "ms", "SDPA auto")
    with torch.no_grad():
        cache = model.build_condition_cache(inp["cond"], inp["text"], inp["ids"])
        def run(m):
            return m(inp["x"], inp["t"], text=inp["text"], img_ids=inp["ids"], id_tokens=inp["id_tokens"],
                     guidance=inp["g"], condition_cache=cache)
        flops = count_flops(lambda: run(model))
        compiled = torch.compile(model)
        start = time.perf_counter()
        run(compiled)
        sync(device)
        rows.add("torch.compile time (KV-cache pass)", time.perf_counter() - start, "s", "")
        seconds = time_call(lambda: run(compiled), device, cfg.repeats, warmup=2)
    rows.add("KV-cache pass, torch.compile", seconds * 1e3, "ms", f"{flops / seconds / ceiling:.2f} of ceiling")
    bench_student(cfg, compiled, vae, device, rows, size, "auto", "KV-cache + torch.compile", kv_cache=True)
    bench_teacher(cfg, compiled, vae, device, rows, size, "KV-cache + torch.compile", kv_cache=True)
    if args.paper_mode:  # the released model's full joint attention, compiled (a second graph)
        with torch.no_grad():
            start = time.perf_counter()
            apple_pass(compiled, inp)
            sync(device)
            rows.add("torch.compile time (APPLE pass)", time.perf_counter() - start, "s", "")
            seconds = time_call(lambda: apple_pass(compiled, inp), device, cfg.repeats, warmup=2)
        full_flops = count_flops(lambda: apple_pass(model, inp))
        rows.add("APPLE pass, torch.compile", seconds * 1e3, "ms", f"{full_flops / seconds / ceiling:.2f} of ceiling")
        bench_student(cfg, compiled, vae, device, rows, size, "auto", "torch.compile")
        bench_teacher(cfg, compiled, vae, device, rows, size, "torch.compile")
        print(profile_pass(compiled, inp, device), flush=True)
    if device.startswith("cuda"):
        rows.add("peak memory", torch.cuda.max_memory_allocated(device) / 2**30, "GiB", "")
    print(rows.table())


if __name__ == "__main__":
    main()
