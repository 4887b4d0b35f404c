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
from appleswap.bench_utils import Rows, count_flops, matmul_ceiling, sdpa_context, sync, time_call


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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=5)
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
    with sdpa_context("auto"):
        bench_student(cfg, compiled, vae, device, rows, size, "auto", "KV-cache + torch.compile", kv_cache=True)
    if device.startswith("cuda"):
        rows.add("peak memory", torch.cuda.max_memory_allocated(device) / 2**30, "GiB", "")
    print(rows.table())


if __name__ == "__main__":
    main()
