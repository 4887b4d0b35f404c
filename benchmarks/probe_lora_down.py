"""How to run the folded LoRA's down-projection ``z = s A x`` (issue 6): the condition rows (1,024 per image) times
the stacked ``lora_A`` (64-256 rows). cuBLAS runs the long-K ones (proj_out K = 15,360, ff_out 12,288, out 3,072)
as split-K GEMMs: a memset pair, the GEMM and a reduce kernel, 76 of each per pass. This probe times the ways to
compute them, each replayed as a CUDA graph of every z GEMM of one pass in block order, and counts the kernels.

    PYTHONPATH=src python benchmarks/probe_lora_down.py [--batch 1] [--replays 20]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from appleswap.bench_utils import graphed_ms, probe_arguments, relative_l2

# (K, N, count per pass) of the folded z GEMMs at FLUX size with the APPLE LoRA (r = 64)
SHAPES = [(3072, 192, 19), (3072, 64, 19), (12288, 64, 19),  # double blocks: qkv, out, ff_out
          (3072, 256, 38), (15360, 64, 38)]  # single blocks: qkv + mlp, proj_out


def split_k(x: torch.Tensor, a: torch.Tensor, parts: int, fp32: bool) -> torch.Tensor:
    """``x @ a^T`` as ``parts`` batched GEMMs over slices of K, summed (no workspace, memset or reduce kernel)."""
    m, k = x.shape
    xs = x.view(m, parts, k // parts).transpose(0, 1)  # (P, M, K/P)
    ws = a.view(a.shape[0], parts, k // parts).permute(1, 2, 0)  # (P, K/P, N)
    partial = torch.bmm(xs, ws, out_dtype=torch.float32) if fp32 else torch.bmm(xs, ws)
    return partial.sum(0, dtype=torch.float32).to(x.dtype)


def variants(parts: int):
    return {"F.linear (cuBLAS, now)": lambda x, a: F.linear(x, a),
            f"bmm split-K x{parts}, bf16 partials": lambda x, a: split_k(x, a, parts, False),
            f"bmm split-K x{parts}, fp32 partials": lambda x, a: split_k(x, a, parts, True)}


def one_pass(fn, inputs):
    return [fn(x, a) for x, a in inputs]


def kernel_count(fn, inputs) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        one_pass(fn, inputs)
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def main() -> None:
    args = probe_arguments(__doc__, options=[("--batch", {"type": int, "default": 1}),
                                             ("--parts", {"type": int, "default": 4})])
    rows = 1024 * args.batch
    inputs = [(torch.randn(rows, k, device="cuda", dtype=torch.bfloat16),
               torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5)
              for k, n, count in SHAPES for _ in range(count)]
    reference = [x.float() @ a.float().t() for x, a in inputs]
    groups, start = [], 0
    for _, _, count in SHAPES:
        groups.append(inputs[start:start + count])
        start += count
    print(f"{len(inputs)} z GEMMs per pass, {rows} condition rows; ms per pass of each shape group (K x N, count)")
    print("| variant | ms per pass | kernels | max rel. error vs fp32 | "
          + " | ".join(f"{k}x{n} ({c})" for k, n, c in SHAPES) + " |")
    print("|---|---|---|---|" + "---|" * len(SHAPES))
    for name, fn in variants(args.parts).items():
        out = one_pass(fn, inputs)
        error = max(relative_l2(o, r) for o, r in zip(out, reference, strict=True))
        for label, run in ((name, fn), (f"{name}, torch.compile", torch.compile(fn, dynamic=False))):
            parts = [graphed_ms([lambda r=run, g=group: one_pass(r, g)], args.replays) for group in groups]
            whole = graphed_ms([lambda r=run: one_pass(r, inputs)], args.replays)
            print(f"| {label} | {whole:.3f} | {kernel_count(run, inputs)} | "
                  f"{error:.2e} | " + " | ".join(f"{t:.3f}" for t in parts) + " |")


if __name__ == "__main__":
    main()
