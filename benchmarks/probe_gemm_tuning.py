"""Two questions about the compiled, graphed APPLE pass on a GPU (issue 6), answered in one run:

1. Does the pass slow down when sustained because the GPU lowers its clocks? ``nvidia-smi`` samples the SM clock,
   power and throttle reasons while 3 and then 28 passes run back to back.
2. Does PyTorch's TunableOp (it times several cuBLASLt candidates per GEMM shape instead of taking the first
   heuristic) make the pass faster? Interleaved A/B: default, tuned, default, tuned (graphs recorded anew each time).

    PYTHONPATH=src python benchmarks/probe_gemm_tuning.py [--tiny --device cpu]
"""

from __future__ import annotations

import argparse
import datetime
import shutil
import statistics
import subprocess
import tempfile
import time

import torch

from appleswap.bench import BenchConfig, apple_pass, build_apple, build_models, make_inputs, pass_timestep_rows
from appleswap.bench_utils import sync, time_call

FIELDS = "timestamp,clocks.sm,power.draw,temperature.gpu,clocks_event_reasons.active"


class ClockLog:
    """``nvidia-smi`` sampling every 100 ms into a file; :meth:`summary` averages the samples of a time window."""

    def __init__(self):
        self.file = tempfile.NamedTemporaryFile("w+", suffix=".csv")  # noqa: SIM115 (closed in close())
        self.process = None
        if shutil.which("nvidia-smi"):
            self.process = subprocess.Popen(["nvidia-smi", f"--query-gpu={FIELDS}", "--format=csv,noheader,nounits",
                                             "-lms", "100"], stdout=self.file, stderr=subprocess.DEVNULL)

    def summary(self, start: float, end: float) -> str:
        if self.process is None:
            return "no nvidia-smi"
        self.file.flush()
        self.file.seek(0)
        samples = []
        for line in self.file.read().splitlines():
            parts = [p.strip() for p in line.split(",")]
            try:
                stamp = datetime.datetime.strptime(parts[0], "%Y/%m/%d %H:%M:%S.%f").timestamp()
                samples.append((stamp, float(parts[1]), float(parts[2]), float(parts[3]), parts[4]))
            except (ValueError, IndexError):
                continue
        window = [s for s in samples if start <= s[0] <= end]
        if not window:
            return "no samples"
        reasons = sorted({s[4] for s in window})
        return (f"SM clock mean {statistics.mean(s[1] for s in window):.0f} MHz (min {min(s[1] for s in window):.0f}),"
                f" power mean {statistics.mean(s[2] for s in window):.0f} W, temp max {max(s[3] for s in window):.0f}"
                f" C, throttle reasons {'/'.join(reasons)} ({len(window)} samples)")

    def close(self) -> None:
        if self.process is not None:
            self.process.terminate()
            self.process.wait()
        self.file.close()


def passes(model, inp, device, count: int, clocks: ClockLog, label: str) -> float:
    with torch.no_grad():
        modulation = model.condition_modulation(inp["text"])
        rows = pass_timestep_rows(model, inp, modulation)
        apple_pass(model, inp, modulation, rows)
        sync(device)
        start = time.time()
        seconds = time_call(lambda: [apple_pass(model, inp, modulation, rows) for _ in range(count)], device, 3, 0)
        end = time.time()
    per_pass = seconds / count * 1e3
    print(f"{label}: {count} passes in a row {per_pass:.2f} ms per pass; {clocks.summary(start, end)}", flush=True)
    return per_pass


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--rounds", type=int, default=2, help="A/B rounds (default, tuned)")
    args = parser.parse_args()
    cfg = BenchConfig(tiny=args.tiny, steps=2 if args.tiny else 28, repeats=1)
    size, dtype = (64, torch.float32) if args.tiny else (512, torch.bfloat16)
    flux, _ = build_models(cfg, args.device, dtype)
    model = build_apple(flux, cfg, 64 if args.tiny else 2048)
    model.fuse_projections()
    cuda = args.device.startswith("cuda")
    if cuda:
        model.compile_blocks()
    inp = make_inputs(cfg, flux, 1, size)
    tunable = torch.cuda.tunable
    clocks = ClockLog()
    results = {"default": [], "tuned": []}
    try:
        for _ in range(args.rounds):
            for label in ("default", "tuned"):
                if cuda:
                    tunable.enable(label == "tuned")
                    tunable.tuning_enable(label == "tuned")
                    if hasattr(tunable, "write_file_on_exit"):  # newer torch; older ones write only on request
                        tunable.write_file_on_exit(False)
                    model.enable_cuda_graphs()  # record anew with this GEMM choice
                started = time.perf_counter()
                passes(model, inp, args.device, 1, clocks, f"{label} (first pass, tuning)")
                print(f"  set-up {time.perf_counter() - started:.1f} s", flush=True)
                results[label].append([passes(model, inp, args.device, n, clocks, label) for n in (3, cfg.steps)])
    finally:
        clocks.close()
    for label, runs in results.items():
        print(f"{label}: 3 in a row {', '.join(f'{r[0]:.2f}' for r in runs)} ms; {cfg.steps} in a row "
              f"{', '.join(f'{r[1]:.2f}' for r in runs)} ms")
    if cuda:
        tuned = tunable.get_results()
        print(f"TunableOp results ({len(tuned)} GEMM shapes):")
        for entry in tuned:
            print("  ", entry)


if __name__ == "__main__":
    main()
