"""Where a whole swap's time goes beyond its passes (issue 6): one compiled, graphed student swap under the CUDA
profiler; prints the wall time, the device-busy time, the largest idle gaps of the device (with the kernels
around them) and the host operations with the most time.

    PYTHONPATH=src python benchmarks/profile_swap.py [--tiny --device cpu] [--steps 28] [--fp8] [--trace trace.json]
"""

from __future__ import annotations

import argparse
import logging
import time

import torch

from appleswap.bench import BenchConfig, _pipe, build_apple, build_models, make_inputs
from appleswap.bench_utils import sync
from appleswap.model.latents import compile_vae, graph_vae_encoder


def device_gaps(prof) -> tuple[float, list[tuple[float, float, str, str]]]:
    """Busy ms and the idle gaps (ms, start ms, kernel before, kernel after) between device kernels, largest first."""
    kernels = sorted((e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA),
                     key=lambda e: e.time_range.start)
    if not kernels:
        return 0.0, []
    busy, gaps, end, before = 0.0, [], kernels[0].time_range.start, kernels[0].name
    origin = kernels[0].time_range.start
    for event in kernels:
        start, stop = event.time_range.start, event.time_range.end
        if start > end:
            gaps.append(((start - end) / 1e3, (end - origin) / 1e3, before[:60], event.name[:60]))
        busy += max(0, stop - max(start, end)) / 1e3
        if stop > end:
            end, before = stop, event.name
    return busy, sorted(gaps, reverse=True)


def label_stages(pipe) -> None:
    """Wrap the swap's stages in profiler labels ("stage: ..."), so their host time shows in the table."""
    import appleswap.pipeline as pipeline_module

    def labelled(name, fn):
        def wrapper(*args, **kwargs):
            with torch.profiler.record_function(f"stage: {name}"):
                return fn(*args, **kwargs)
        return wrapper

    for name in ("encode_source", "encode_latents", "schedule", "step_table", "denoiser", "_batch_ids", "_memo"):
        setattr(pipe, name, labelled(name, getattr(pipe, name)))
    for name in ("prepare_noise", "image_ids", "sample_euler", "decode_tokens", "images_to_tensor"):
        setattr(pipeline_module, name, labelled(name, getattr(pipeline_module, name)))
    for name in ("modulation_state", "pass_constants"):
        setattr(pipe.transformer, name, labelled(name, getattr(pipe.transformer, name)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--steps", type=int, default=28)
    parser.add_argument("--trace", help="also write a Chrome trace here")
    parser.add_argument("--fp8", action="store_true", help="quantise the blocks to fp8 (row-wise) first")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = BenchConfig(tiny=args.tiny, steps=args.steps, repeats=1)
    size, dtype = (64, torch.float32) if args.tiny else (512, torch.bfloat16)
    flux, vae = build_models(cfg, args.device, dtype)
    model = build_apple(flux, cfg, 64 if args.tiny else 2048)
    if args.fp8:
        model.quantize_fp8(device=args.device)
    model.fuse_projections()
    if args.device.startswith("cuda"):  # as the pipeline's compile=True, cuda_graphs=True
        model.compile_blocks()
        model.enable_cuda_graphs()
        compile_vae(vae)
        graph_vae_encoder(vae)
    inp = make_inputs(cfg, flux, 1, size)
    pipe, target = _pipe(model, vae, inp), torch.rand(1, 3, size, size, device=args.device)

    label_stages(pipe)

    def swap():
        return pipe(inp["id_tokens"], target, num_steps=cfg.steps, output_type="pt")

    for _ in range(2):
        swap()
    sync(args.device)
    start = time.perf_counter()
    swap()
    sync(args.device)
    wall = (time.perf_counter() - start) * 1e3
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        swap()
        sync(args.device)
    busy, gaps = device_gaps(prof)
    print(f"swap wall {wall:.1f} ms (unprofiled); device busy {busy:.1f} ms; idle gaps {sum(g[0] for g in gaps):.1f} ms "
          f"in {len(gaps)} gaps")
    for gap, at, before, after in gaps[:25]:
        print(f"  gap {gap:7.2f} ms at {at:8.1f} ms  after {before}  before {after}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    if args.device.startswith("cuda"):  # the device side: the passes' kernels and the VAE's
        print(prof.key_averages().table(sort_by="self_device_time_total", row_limit=40, max_name_column_width=60))
    stages = [e for e in prof.key_averages() if e.key.startswith("stage:")]
    for event in sorted(stages, key=lambda e: -e.cpu_time_total):
        print(f"  {event.key:32s} host {event.cpu_time_total / 1e3:8.1f} ms over {event.count} call(s)")
    if args.trace:
        prof.export_chrome_trace(args.trace)
    passes_back_to_back(model, inp, args.device, cfg.steps)


def passes_back_to_back(model, inp, device, steps: int) -> None:
    """Per-pass time of 3 vs ``steps`` passes in a row (same inputs): does a sustained run slow down?"""
    from appleswap.bench import apple_pass, pass_timestep_rows
    from appleswap.bench_utils import time_call

    with torch.no_grad():
        modulation = model.condition_modulation(inp["text"])
        rows = pass_timestep_rows(model, inp, modulation)
        for count in (3, steps, 3):
            seconds = time_call(lambda n=count: [apple_pass(model, inp, modulation, rows) for _ in range(n)], device,
                                repeats=3)
            print(f"{count} passes in a row: {seconds / count * 1e3:.2f} ms per pass")


if __name__ == "__main__":
    main()
