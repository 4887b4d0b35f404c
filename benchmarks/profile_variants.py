"""Where the time of one APPLE pass goes, variant by variant (issue 6): per-pass latency, the time the host takes
to issue the pass, the device's busy time, and the kernels by kind (GEMM, attention, compiled fused kernels,
eager elementwise) for the plain diffusers forward and the APPLE forward eager / compiled / fused / with its
LoRA or ID attention switched off / under a whole-pass CUDA graph; then swaps with the fastest setting.

    PYTHONPATH=src python benchmarks/profile_variants.py [--tiny --device cpu] [--variants a,b,...]
"""

from __future__ import annotations

import argparse
import itertools
import logging
import re
import time

import torch

from appleswap.bench import (
    BenchConfig,
    build_apple,
    build_models,
    make_inputs,
    pass_timestep_rows,
    plain_pass,
    swap_constants,
)
from appleswap.bench_tiers import swap_rows
from appleswap.bench_utils import Rows, count_flops, matmul_ceiling, relative_l2, sdpa_context, sync, time_call
from appleswap.model import kernels

KINDS = [("GEMM", r"gemm|nvjet|cutlass|xmma|matmul|sm90|splitk"), ("attention", r"flash|fmha|attention|cudnn"),
         ("compiled fused (triton)", r"triton"), ("eager elementwise / copy", r"elementwise|vectorized|copy|cat|fill"),
         ("norm / reduce", r"norm|reduce")]


TOP_KERNELS = 0  # --top: also print the N kernels with the most device time per profiled variant
TOP_GAPS = 0  # --gaps: also print the idle time between kernels, by size and by the pair of kernels around it


def short_name(name: str) -> str:
    """A kernel's name cut to what tells kernels apart (template arguments and triton's numbering dropped)."""
    name = re.sub(r"<.*", "", name.split("(")[0])
    return re.sub(r"_\d+$", "", name)[:60]


def print_memsets(prof) -> None:
    """Memsets of one profiled call: their device time, and the host ops that asked for them (eager or compiled
    without a graph: a CUDA graph's replay has no host ops to link them to)."""
    from torch.autograd import DeviceType

    device = [e for e in prof.events() if e.device_type == DeviceType.CUDA and "memset" in e.name.lower()]
    print(f"    {len(device)} memsets on the device, {sum(e.device_time_total for e in device) / 1e3:.2f} ms")
    callers: dict[str, int] = {}
    for event in prof.events():
        if event.device_type == DeviceType.CPU and "memset" in event.name.lower():
            chain, parent = [], event.cpu_parent
            while parent is not None and len(chain) < 4:
                chain.append(parent.name)
                parent = parent.cpu_parent
            key = " < ".join(chain) or "(no parent op)"
            callers[key] = callers.get(key, 0) + 1
    for key, count in sorted(callers.items(), key=lambda kv: -kv[1])[:12]:
        print(f"    {count:5d}x {key[:200]}")


def print_gaps(prof) -> None:
    """Idle device time between consecutive kernels of one profiled call: a histogram and the top pairs."""
    from torch.autograd import DeviceType

    launched = sorted((e for e in prof.events() if e.device_type == DeviceType.CUDA),
                      key=lambda e: e.time_range.start)
    bins = {"<1 us": [0, 0.0], "1-2 us": [0, 0.0], "2-4 us": [0, 0.0], "4-8 us": [0, 0.0], ">=8 us": [0, 0.0]}
    pairs: dict[tuple[str, str], list] = {}
    for before, after in itertools.pairwise(launched):
        gap = after.time_range.start - before.time_range.end
        if gap <= 0:
            continue
        key = next(k for k, top in zip(bins, (1, 2, 4, 8, float("inf"))) if gap < top)
        bins[key][0] += 1
        bins[key][1] += gap
        pair = pairs.setdefault((short_name(before.name), short_name(after.name)), [0, 0.0])
        pair[0] += 1
        pair[1] += gap
    print(f"    gaps between {len(launched)} kernels: " + ", ".join(
        f"{k}: {n} ({total / 1e3:.2f} ms)" for k, (n, total) in bins.items()))
    for (before, after), (count, total) in sorted(pairs.items(), key=lambda kv: -kv[1][1])[:TOP_GAPS]:
        print(f"    {total / 1e3:6.2f} ms {count:5d}x  {before} -> {after}")


def kernel_profile(fn, device) -> tuple[float, dict[str, float]]:
    """Device-busy ms of one call and ms per kernel kind (CUDA only); the top kernels printed with ``--top``."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        sync(device)
    kinds: dict[str, float] = {}
    if TOP_GAPS:
        print_gaps(prof)
        print_memsets(prof)
    entries = [e for e in prof.key_averages() if e.device_type == DeviceType.CUDA]
    if TOP_KERNELS:
        print(f"    {sum(e.count for e in entries)} kernels and copies per call")
    for entry in sorted(entries, key=lambda e: -e.self_device_time_total)[:TOP_KERNELS]:
        print(f"    {entry.self_device_time_total / 1e3:7.2f} ms {entry.count:5d}x  {entry.key[:110]}")
    for entry in entries:
        kind = next((k for k, pattern in KINDS if re.search(pattern, entry.key, re.IGNORECASE)), "other")
        kinds[kind] = kinds.get(kind, 0.0) + entry.self_device_time_total / 1e3
    return sum(kinds.values()), kinds


def issue_ms(fn, device) -> float:
    """Host time to enqueue one call (the device drains it afterwards)."""
    sync(device)
    start = time.perf_counter()
    fn()
    seconds = time.perf_counter() - start
    sync(device)
    return seconds * 1e3


def measure(name, fn, device, rows: Rows, flops: float, ceiling: float, repeats: int) -> float:
    with torch.no_grad():
        seconds = time_call(fn, device, repeats, warmup=3)
        issue = issue_ms(fn, device)
        note = f"{flops / seconds / ceiling:.2f} of ceiling; host issue {issue:.1f} ms"
        if str(device).startswith("cuda"):
            busy, kinds = kernel_profile(fn, device)
            parts = ", ".join(f"{k} {v:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
            note += f"; device busy {busy:.1f} ms ({parts})"
    rows.add(name, seconds * 1e3, "ms", note)
    return seconds


def setup(model, fused: str | None, compiled: bool | str, graphs: bool) -> None:
    """``fused``: None (separate layers), "fold" (fused, LoRA folded in) or "apart" (fused, LoRA computed apart).
    ``compiled``: False, True (default inductor), a torch.compile mode, or "tuned" (coordinate-descent tuning of
    the generated kernels)."""
    import torch._inductor.config as inductor

    model.enable_cuda_graphs(False)
    model.uncompile_blocks()
    torch._dynamo.reset()
    if fused:
        model.fuse_projections(fold_lora=fused == "fold")
    else:
        model.unfuse_projections()
    inductor.coordinate_descent_tuning = compiled == "tuned"
    if compiled:
        model.compile_blocks(mode=compiled if isinstance(compiled, str) and compiled != "tuned" else None)
    if graphs:
        model.enable_cuda_graphs()


def set_inductor_options(options: str) -> None:
    """``key=value`` pairs (comma-separated) set on ``torch._inductor.config`` (ints where they parse)."""
    import torch._inductor.config as inductor

    for item in filter(None, options.split(",")):
        key, value = item.split("=", 1)
        *path, name = key.split(".")
        target = inductor
        for part in path:
            target = getattr(target, part)
        if not hasattr(target, name):
            raise SystemExit(f"--inductor: no option {key!r}")
        setattr(target, name, int(value) if value.lstrip("-").isdigit() else value)
        print(f"inductor {key} = {getattr(target, name)!r}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--variants", default="plain,plain-compiled,eager,compiled-separate,compiled,no-lora,no-id,"
                        "graph,graph-apart,graph-cudnn,graph-flash,graph-separate,eager-graph,swaps")
    parser.add_argument("--top", type=int, default=0, help="print the N kernels with the most device time")
    parser.add_argument("--gaps", type=int, default=0, help="print the idle time between kernels: its histogram "
                        "and the N pairs of kernels with the most idle time between them")
    parser.add_argument("--fp8", action="store_true", help="quantise the blocks to fp8 (row-wise) first")
    parser.add_argument("--fp8-folded", action="store_true",
                        help="with --fp8: fold the condition LoRA into the fused GEMMs instead of merged e4m3 "
                             "condition weights (the A/B of round 12)")
    parser.add_argument("--fp8-exact-accum", action="store_true",
                        help="with --fp8: the fp8 GEMMs without torch._scaled_mm's use_fast_accum (default: with)")
    parser.add_argument("--swap-sdpa", default="auto", help="SDPA backend of the swap rows (auto, flash, cudnn, ...)")
    parser.add_argument("--as-swaps", action="store_true",
                        help="passes get this timestep's AdaLN rows, the prompt embedding, RoPE and the ID keys and values "
                             "precomputed, as in swaps")
    parser.add_argument("--inductor", default="",
                        help="inductor config for the compiled variants, e.g. 'triton.multi_kernel=2,aggressive_fusion=1'")
    args = parser.parse_args()
    set_inductor_options(args.inductor)
    global TOP_KERNELS, TOP_GAPS
    TOP_KERNELS, TOP_GAPS = args.top, args.gaps
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    cfg = BenchConfig(tiny=args.tiny, steps=2 if args.tiny else 28, repeats=3)
    device, size = args.device, 64 if args.tiny else 512
    dtype = torch.float32 if args.tiny else torch.bfloat16
    todo = set(args.variants.split(","))
    rows = Rows()
    ceiling = matmul_ceiling(device, dtype, 256 if args.tiny else 8192)
    rows.add("matmul ceiling", ceiling / 1e12, "TFLOP/s", "")
    flux, vae = build_models(cfg, device, dtype)
    inp = make_inputs(cfg, flux, 1, size)
    with torch.no_grad():
        plain_flops = count_flops(lambda: plain_pass(flux, inp))
    if "plain" in todo:
        measure("plain diffusers pass, eager", lambda: plain_pass(flux, inp), device, rows, plain_flops, ceiling,
                args.repeats)
    if "plain-compiled" in todo:
        flux.compile_repeated_blocks(fullgraph=True, dynamic=False)
        measure("plain diffusers pass, regional compile", lambda: plain_pass(flux, inp), device, rows, plain_flops,
                ceiling, args.repeats)
        for block in list(flux.transformer_blocks) + list(flux.single_transformer_blocks):
            block._compiled_call_impl = None
    model = build_apple(flux, cfg, 64 if args.tiny else 2048)
    unquantised = None
    if args.fp8:
        unquantised = eager_output(model, inp)
        model.quantize_fp8(device=device, fast_accum=not args.fp8_exact_accum, merge_condition=not args.fp8_folded)
    run_variants(model, vae, inp, device, rows, ceiling, args, todo, cfg, size, unquantised)
    print(rows.table())


def eager_output(model, inp) -> torch.Tensor:
    """The eager, unfused pass in the model's own dtype (fp32 copy): the reference for the fp8 rows' error."""
    kernels.set_enabled(False)
    with torch.no_grad():
        return model(inp["x"], inp["t"], text=inp["text"], img_ids=inp["ids"], condition=inp["cond"],
                     id_tokens=inp["id_tokens"], guidance=inp["g"]).float()


def run_variants(model, vae, inp, device, rows, ceiling, args, todo, cfg, size, unquantised=None) -> None:
    with torch.no_grad():
        modulation = model.condition_modulation(inp["text"])
        step_rows = pass_timestep_rows(model, inp, modulation) if args.as_swaps else None
        constants = swap_constants(model, inp) if args.as_swaps else None

    def apple(id_tokens=inp["id_tokens"]):
        hoisted = constants if id_tokens is not None else None  # "no ID tokens": computed in the pass, no ID path
        return model(inp["x"], inp["t"], text=inp["text"], img_ids=inp["ids"], condition=inp["cond"],
                     id_tokens=None if hoisted is not None else id_tokens, guidance=inp["g"], modulation=modulation,
                     timestep_modulation=step_rows, constants=hoisted)

    kernels.set_enabled(False)  # the reference: eager torch code throughout
    with torch.no_grad():
        flops = count_flops(apple)
        reference = apple().float()
    plan = [  # key, name, fused (None / "fold" / "apart"), compiled, CUDA graph, SDPA backend
        ("eager", "APPLE eager, fused", "fold", False, False, "auto"),
        ("compiled-separate", "APPLE compiled, separate projections", None, True, False, "auto"),
        ("compiled", "APPLE compiled, fused", "fold", True, False, "auto"),
        ("graph", "APPLE compiled, fused, whole-pass CUDA graph", "fold", True, True, "auto"),
        ("graph-apart", "APPLE compiled, fused, LoRA apart (not folded), CUDA graph", "apart", True, True, "auto"),
        ("graph-cudnn", "APPLE compiled, fused, CUDA graph, SDPA cuDNN", "fold", True, True, "cudnn"),
        ("graph-flash", "APPLE compiled, fused, CUDA graph, SDPA flash", "fold", True, True, "flash"),
        ("graph-separate", "APPLE compiled, separate projections, CUDA graph", None, True, True, "auto"),
        ("eager-graph", "APPLE eager, fused, whole-pass CUDA graph", "fold", False, True, "auto"),
        ("graph-torch", "APPLE compiled, fused, CUDA graph, no Triton kernels (torch code for QK norm + RoPE)", "fold",
         True, True, "auto"),
        ("graph-tuned", "APPLE compiled (coordinate-descent tuned kernels), fused, CUDA graph", "fold", "tuned", True,
         "auto"),
        ("graph-autotune", "APPLE compiled (max-autotune-no-cudagraphs), fused, CUDA graph", "fold",
         "max-autotune-no-cudagraphs", True, "auto")]
    for key, name, fused, compiled, graphs, backend in plan:
        if key not in todo:
            continue
        kernels.set_enabled(key != "graph-torch")
        setup(model, fused, compiled, graphs)
        with sdpa_context(backend if str(device).startswith("cuda") else "auto"):
            measure(name, apple, device, rows, flops, ceiling, args.repeats)
            with torch.no_grad():
                output = apple().float()
        rows.add(f"{name}: rel. L2 diff to eager", relative_l2(output, reference), "", "")
        if unquantised is not None:
            rows.add(f"{name}: rel. L2 diff to the unquantised eager pass", relative_l2(output, unquantised), "", "")
        if key == "compiled" and "no-id" in todo:
            measure("APPLE compiled, fused, no ID tokens", lambda: apple(None), device, rows, flops, ceiling,
                    args.repeats)
        if key == "graph" and constants is not None and "graph-in-pass" in todo:
            kept, constants = constants, None  # A/B: the prompt embedding, RoPE and ID keys/values in every pass
            measure(f"{name}, per-swap constants computed in the pass", apple, device, rows, flops, ceiling,
                    args.repeats)
            constants = kept
        if key in ("compiled", "graph") and "no-lora" in todo:
            model.flux.disable_adapters()
            model.enable_cuda_graphs(graphs)  # record anew: the adapter state is part of what a graph runs
            measure(f"{name}, LoRA off", apple, device, rows, flops, ceiling, args.repeats)
            model.flux.enable_adapters()
            model.enable_cuda_graphs(graphs)
    if "sustained" in todo:
        setup(model, "fold", True, True)
        sustained_rows(model, apple, device, rows, cfg.steps)
    if "swaps" in todo:
        setup(model, "fold", True, True)
        swap_rows(cfg, model, vae, inp, device, size, args.swap_sdpa, f"compiled + CUDA graph, SDPA {args.swap_sdpa}",
                  rows, batch=2)


def sustained_rows(model, apple, device, rows, steps: int) -> None:
    """Is a swap's step slower than one timed pass because of the host or because of the GPU's clocks? The graphed
    pass ``steps`` times in a row through the model (the host's per-pass work included) and as bare graph replays
    (device only), one synchronisation at the end of each; against one pass timed alone."""
    with torch.no_grad():
        for _ in range(3):
            apple()
        sync(device)
        recordings = list(model.graph_runner.recordings.values())  # none off CUDA
        calls = [("through the model", apple)] + [("bare graph replays", r.graph.replay) for r in recordings[:1]]
        timings = {}
        for name, call in calls * 2:
            start = time.perf_counter()
            for _ in range(steps):
                call()
            sync(device)
            timings.setdefault(name, []).append((time.perf_counter() - start) / steps * 1e3)
            time.sleep(2)  # the same rest before each
        single = time_call(apple, device, 5, warmup=1)
    for name, values in timings.items():
        rows.add(f"graphed pass, {steps} in a row, {name}", min(values), "ms",
                 f"rounds {', '.join(f'{v:.2f}' for v in values)}; one pass timed alone {single * 1e3:.2f} ms")


if __name__ == "__main__":
    main()
