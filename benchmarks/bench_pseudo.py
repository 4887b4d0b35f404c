"""Issue 27: pseudo-triplets per hour per GPU, ``appleswap pseudo``'s teacher + attribute-aware inversion in batches.

Random full-size weights built the way ``appleswap bench`` builds them (full FLUX.1 transformer, 20 PuLID ID
cross-attentions, a rank-64 LoRA, the FLUX VAE architecture; no downloads), set up by the same
``appleswap.speed.attach_speed`` as ``appleswap pseudo`` (fused projections, compiled blocks and VAE, CUDA graphs; fp8
block weights for the fp8 rows), driven by the real ``PseudoGenerator`` (56 passes per pair: 28 inversion + 28
generation at 512x512). Each precision gets a fresh model; each batch size one untimed call first (compile and
graph recording), then ``--repeats`` timed calls. The batch-1 row times each of the largest batch's pairs alone;
those are also the reference the batched outputs are compared with (max absolute difference, pixels in [0, 1]).

    PYTHONPATH=src python benchmarks/bench_pseudo.py                        # the table (H100: ~5 min)
    PYTHONPATH=src python benchmarks/bench_pseudo.py --tiny --device cpu    # smoke test of the benchmark itself
    PYTHONPATH=src python benchmarks/bench_pseudo.py --sdpa cudnn --profile # one attention kernel; where a call goes

``--sdpa`` picks PyTorch's attention backend for the whole run (the compiled blocks and recorded graphs keep the
kernel they were traced with, so compare backends in separate runs); ``auto`` is what ``appleswap pseudo`` uses.

Not timed: reading the inputs and writing PNGs and scores (``generate_pairs`` writes them on a background thread
while the next batch runs).
"""

from __future__ import annotations

import argparse
import functools
import gc
import logging
import sys
import time
from pathlib import Path

logger = logging.getLogger("appleswap.bench_pseudo")
FULL_ID_DIM, TINY_ID_DIM = 2048, 64


def build_generator(tiny: bool, device: str, fp8: bool, compile: bool, cuda_graphs: bool, steps: int,
                    batch_size: int):
    """A teacher ``SwapPipeline`` on random weights with ``appleswap pseudo``'s speed options, in a generator."""
    import torch

    from appleswap.benchmark.models import build_apple, build_models, make_inputs
    from appleswap.benchmark.settings import BenchConfig
    from appleswap.pipeline import SwapPipeline
    from appleswap.speed import attach_speed
    from appleswap.train.pseudo_gen import PseudoGenerator

    cfg = BenchConfig(tiny=tiny, steps=steps)
    dtype = torch.float32 if tiny else torch.bfloat16
    flux, vae = build_models(cfg, device, dtype)
    model = build_apple(flux, cfg, TINY_ID_DIM if tiny else FULL_ID_DIM)
    attach_speed(model, device, fp8=fp8, compile=compile, cuda_graphs=cuda_graphs, vae=vae)
    text = make_inputs(cfg, flux, 1, 64 if tiny else 512)["text"]
    null_id = torch.randn(1, 32, TINY_ID_DIM if tiny else FULL_ID_DIM, generator=torch.Generator().manual_seed(7))
    pipe = SwapPipeline(model, vae, text, "teacher", null_id=null_id, compute_device=torch.device(device))
    return PseudoGenerator(pipe, num_steps=steps, batch_size=batch_size)


def random_pairs(count: int, tiny: bool):
    """(targets, conditions, source tokens) on the CPU, as ``generate_pairs`` hands them over."""
    import torch

    size, width = (64, TINY_ID_DIM) if tiny else (512, FULL_ID_DIM)
    generator = torch.Generator().manual_seed(0)
    return (torch.rand(count, 3, size, size, generator=generator),
            torch.rand(count, 3, size, size, generator=generator),
            torch.randn(count, 32, width, generator=generator))


def peak_gib(device: str) -> float:
    import torch

    return torch.cuda.max_memory_allocated(device) / 2**30 if device.startswith("cuda") else float("nan")


def bench_precision(args, precision: str, rows, profiles: list[str]) -> None:
    """Rows of one precision: batch 1 (each pair alone) and every larger batch, same pairs (``--profile``: and
    where one call of the largest batch goes, appended to ``profiles``)."""
    import torch

    from appleswap.benchmark.utils import sync, time_call

    largest = max(args.batches)
    pairs = random_pairs(largest, args.tiny)
    generator = build_generator(args.tiny, args.device, precision == "fp8", args.compile, args.cuda_graphs,
                                args.steps, 1)
    label = f"{'fp32 (tiny)' if args.tiny else 'bf16'}{' + fp8 blocks' if precision == 'fp8' else ''}"
    start = time.perf_counter()
    generator.swap(*(x[:1] for x in pairs))  # compile + graph recording
    sync(args.device)
    first = time.perf_counter() - start
    singles, times = [], []
    for index in range(largest):
        start = time.perf_counter()
        singles.append(generator.swap(*(x[index:index + 1] for x in pairs)))
        sync(args.device)
        times.append(time.perf_counter() - start)
    reference = torch.cat(singles)
    seconds = sorted(times)[len(times) // 2]
    rows.add(f"{label}, batch 1", 3600 / seconds, "triplets/h",
             f"{seconds:.3f} s per pair (median of {largest}); first call {first:.0f} s; peak {peak_gib(args.device):.1f} GiB")
    for batch in sorted(b for b in args.batches if b > 1):
        generator.batch_size = batch
        if args.device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats(args.device)
        start = time.perf_counter()
        out = generator.swap(*(x[:batch] for x in pairs))  # compile + graph recording for this shape
        sync(args.device)
        first = time.perf_counter() - start
        seconds = time_call(functools.partial(generator.swap, *(x[:batch] for x in pairs)), args.device, args.repeats,
                            warmup=0)
        difference = (out - reference[:batch]).abs().max().item()
        rows.add(f"{label}, batch {batch}", 3600 * batch / seconds, "triplets/h",
                 f"{seconds:.3f} s per batch ({seconds / batch:.3f} s per pair, median of {args.repeats}); first call "
                 f"{first:.0f} s; peak {peak_gib(args.device):.1f} GiB; max abs. difference to batch 1 {difference:.2g}")
    if args.profile:
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # as a script or loaded by path (tests)
        from bench_train_step import profile_steps  # the training benchmark's kernel-kind table

        call = functools.partial(generator.swap, *(x[:largest] for x in pairs))
        profiles.append(f"{label}, batch {largest}, one call profiled:\n"
                          + profile_steps(lambda seed: call(), args.device, seconds, top=True, steps=1))


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test)")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--batches", default="1,4", help="comma-separated batch sizes (1 is always timed)")
    parser.add_argument("--precisions", default="bf16,fp8", help="bf16 and/or fp8 (e4m3 block weights)")
    parser.add_argument("--steps", type=int, default=28, help="inversion steps = generation steps")
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per batch size")
    parser.add_argument("--no-compile", dest="compile", action="store_false", help="eager blocks and VAE")
    parser.add_argument("--no-cuda-graphs", dest="cuda_graphs", action="store_false", help="no CUDA graphs")
    parser.add_argument("--sdpa", default="auto", choices=["auto", "flash", "cudnn", "efficient", "math"],
                        help="attention backend for the whole run (auto: PyTorch's choice, as appleswap pseudo)")
    parser.add_argument("--profile", action="store_true", help="also profile one call of the largest batch")
    parser.add_argument("--log-level", default="INFO")
    args = parser.parse_args(argv)
    args.batches = sorted({1, *(int(b) for b in args.batches.split(","))})
    args.precisions = [p.strip() for p in args.precisions.split(",")]
    if min(args.batches) < 1 or not set(args.precisions) <= {"bf16", "fp8"}:
        parser.error("--batches must be positive integers, --precisions bf16 and/or fp8")
    return args


def main(argv: list[str] | None = None) -> int:
    from appleswap.benchmark.utils import Rows, sdpa_context
    from appleswap.cli_common import inference_blas_defaults

    args = parse(argv)
    logging.basicConfig(level=args.log_level, format="%(message)s")
    inference_blas_defaults()  # as `appleswap pseudo`: before any CUDA work
    import torch

    if args.device.startswith("cuda"):
        torch.backends.cuda.matmul.allow_tf32 = True
        name = torch.cuda.get_device_name(args.device)
    else:
        name = "CPU"
    rows, profiles = Rows(), []
    for precision in args.precisions:
        with sdpa_context(args.sdpa):
            bench_precision(args, precision, rows, profiles)  # a fresh model each; the last one freed before the next
        gc.collect()
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(args.device)
    print(f"pseudo-triplets (teacher + inversion, {2 * args.steps} passes per pair) on {name}, torch "
          f"{torch.__version__}, {'tiny config' if args.tiny else 'full FLUX.1, 512x512'}, compile={args.compile}, "
          f"cuda_graphs={args.cuda_graphs}, attention backend {args.sdpa}")
    print(rows.table())
    for note in profiles:
        print("\n" + note)
    return 0


if __name__ == "__main__":
    sys.exit(main())
