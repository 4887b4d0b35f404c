"""Probe: the fp8 attention kernel (``fp8_attention_kernel.py``, not adopted) against torch's bf16 SDPA at FLUX's size.

Times one attention call as the blocks make it ((B, N, H, D) queries/keys, values a view of the fused projection,
(B, N, H * D) out) for cuDNN and flash bf16 SDPA and for the fp8 kernel in several tile configurations, each with
and without its quantisation pre-pass; and each output's relative L2 to fp32 attention. Usage (GPU):

    PYTHONPATH=src python benchmarks/probe_fp8_attention.py [--tokens 2560] [--heads 24] [--sharpness 1 2]
"""

from __future__ import annotations

import argparse
import functools
import statistics

import fp8_attention_kernel as fa  # benchmarks/, next to this script
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from appleswap.bench_utils import relative_l2

CONFIGS = [(128, 128, 8, 2), (128, 128, 8, 3), (128, 64, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (64, 64, 4, 4),
           (128, 128, 4, 2)]


def timed(fn, repeats: int = 50, groups: int = 5) -> float:
    """Median over ``groups`` of the mean time per call (ms) of ``repeats`` calls, CUDA events."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(groups):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(repeats):
            fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / repeats)
    return statistics.median(times)


def sdpa(query, key, value, backend):
    with sdpa_kernel([backend]):
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2))
    return out.transpose(1, 2).flatten(2, 3)


def inputs(tokens: int, heads: int, dim: int, sharpness: float, seed: int = 0):
    """Queries and keys RMS-normalised (as FLUX's QK norm) times ``sharpness``; values a strided view."""
    gen = torch.Generator(device="cuda").manual_seed(seed)
    shape = (1, tokens, heads, dim)
    query = (F.rms_norm(torch.randn(shape, device="cuda", generator=gen), (dim,)) * sharpness).bfloat16()
    key = (F.rms_norm(torch.randn(shape, device="cuda", generator=gen), (dim,)) * sharpness).bfloat16()
    fused = torch.randn(1, tokens, 3 * heads * dim, device="cuda", generator=gen).bfloat16()
    value = fused[..., 2 * heads * dim:].unflatten(-1, (heads, dim))
    return query, key, value


def row(label: str, ms: float, flops: int, err: float, extra: str = "") -> None:
    print(f"| {label} | {ms:.4f}{extra} | {flops / ms / 1e9:.0f} | {err:.4f} |")


def probe(query, key, value, flops: int) -> None:
    """One table: bf16 SDPA backends, the quantisation pre-pass, the fp8 kernel's configurations."""
    exact = sdpa(query.float(), key.float(), value.float(), SDPBackend.MATH)

    def error(out):
        return relative_l2(out, exact)

    for name, backend in (("cudnn bf16", SDPBackend.CUDNN_ATTENTION), ("flash bf16", SDPBackend.FLASH_ATTENTION)):
        call = functools.partial(sdpa, query, key, value, backend)
        row(name, timed(call), flops, error(call()))
    for pv_fp8 in (True, False):
        ms = timed(functools.partial(fa.quantize_operands, query, key, value, pv_fp8, wrap=False))
        print(f"| quantisation pre-pass ({'q, k, v' if pv_fp8 else 'q, k'}) | {ms:.4f} | | |")
        operands = fa.quantize_operands(query, key, value, pv_fp8, wrap=False)
        for block_m, block_n, warps, stages in CONFIGS:
            call = functools.partial(fa.launch_fp8_attention, query, key, value, pv_fp8, block_m, block_n, warps,
                                     stages, wrap=False)
            label = f"fp8 {'QK+PV' if pv_fp8 else 'QK only'} {block_m}x{block_n} w{warps} s{stages}"
            try:
                ms = timed(call)
            except (RuntimeError, ValueError) as exc:  # triton's OutOfResources is a RuntimeError
                print(f"| {label} | failed: {type(exc).__name__}: {str(exc)[:120]} |")
                continue
            alone = timed(functools.partial(call, operands=operands))
            row(label, ms, flops, error(call()), f" (attention alone {alone:.4f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=2560)
    parser.add_argument("--heads", type=int, default=24)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--sharpness", type=float, nargs="+", default=[1.0, 3.0])
    args = parser.parse_args()
    torch.backends.cuda.matmul.allow_tf32 = False
    flops = 4 * args.tokens**2 * args.heads * args.dim
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, {args.tokens} tokens x {args.heads} heads "
          f"x {args.dim}; {flops / 1e9:.1f} GFLOP per call")
    for sharpness in args.sharpness:
        query, key, value = inputs(args.tokens, args.heads, args.dim, sharpness)
        print(f"\nsharpness {sharpness}: | variant | ms per call | TFLOP/s | rel. L2 to fp32 |")
        probe(query, key, value, flops)
    query, key, value = (x[:, :512] for x in inputs(args.tokens, args.heads, args.dim, 1.0))
    reference = fa.fp8_attention_reference(query, key, value)
    kernel = fa.launch_fp8_attention(query, key, value, wrap=False)
    print(f"kernel vs torch reference of the same arithmetic (512 tokens): rel. L2 "
          f"{relative_l2(kernel, reference):.2e}")


if __name__ == "__main__":
    main()
