"""The compiled rows of `appleswap bench` alone (VAE, the pass as swaps run it, student / teacher / batched swaps),
for an A/B across commits: it imports the benchmark functions from either package layout (``appleswap.benchmark``
since the speed redesign, ``appleswap.bench`` + ``appleswap.bench_speed`` before it), so the same script times an
old tree and the current one on the same machine:

    git archive 6a53fb0 src | tar -x -C /tmp/before
    PYTHONPATH=/tmp/before/src python benchmarks/bench_compiled_rows.py     # before
    PYTHONPATH=src python benchmarks/bench_compiled_rows.py                 # after
    PYTHONPATH=src python benchmarks/bench_compiled_rows.py --tiny          # CPU smoke test

Set ``CUBLASLT_WORKSPACE_SIZE=0`` as the inference commands do. Random full-size weights, bf16, batch 4.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU (smoke test)")
    parser.add_argument("--repeats", type=int, default=3, help="timed repeats per row (median)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    import torch

    if importlib.util.find_spec("appleswap.benchmark") is not None:
        from appleswap.benchmark.compiled import bench_vae, compiled_rows
        from appleswap.benchmark.models import build_apple, build_models
        from appleswap.benchmark.settings import BenchConfig
        from appleswap.benchmark.utils import Rows, matmul_ceiling
    else:  # the layout before the speed redesign
        from appleswap.bench import BenchConfig, build_apple, build_models
        from appleswap.bench_speed import bench_vae, compiled_rows
        from appleswap.bench_utils import Rows, matmul_ceiling
    device = "cpu" if args.tiny else "cuda"
    dtype, size = (torch.float32, 64) if args.tiny else (torch.bfloat16, 512)
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
    cfg = BenchConfig(tiny=args.tiny, repeats=1 if args.tiny else args.repeats, steps=1 if args.tiny else 28,
                      batch=2 if args.tiny else 4, compile=True, eager_swaps=False, kv_cache=False, train=False,
                      fp8=False, offload=False)
    rows = Rows()
    ceiling = matmul_ceiling(device, dtype, 256 if args.tiny else 8192)
    rows.add("matmul ceiling", ceiling / 1e12, "TFLOP/s", "same run")
    flux, vae = build_models(cfg, device, dtype)
    model = build_apple(flux, cfg, 64 if args.tiny else 2048)
    model.fuse_projections()
    bench_vae(cfg, vae, device, rows, size)
    compiled_rows(cfg, model, vae, device, rows, ceiling, size)
    print(rows.table())
    return 0


if __name__ == "__main__":
    sys.exit(main())
