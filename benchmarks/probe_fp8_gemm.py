"""The fp8 GEMMs of one APPLE pass, timed alone (issue 6): every ``torch._scaled_mm`` of a fused fp8 pass at FLUX
size in block order, replayed as one CUDA graph, per variant: row-wise or per-tensor scales, with and without
``use_fast_accum``; bf16 ``F.linear`` over the same shapes for comparison. Per shape it also prints the error
against fp32 on the same e4m3 operands (what the accumulation adds) and against the bf16 product (all of fp8).

    PYTHONPATH=src python benchmarks/probe_fp8_gemm.py [--replays 20]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from appleswap.bench_utils import device_line, graphed_ms, probe_arguments, relative_l2
from appleswap.model.fp8 import quantize_fp8

# (name, M, K, N, count per pass) of the fused fp8 pass at 512x512 (2,560 tokens: 512 text, 1,024 image, 1,024
# condition) with the folded r64 LoRA's columns in K (padded to 16)
SHAPES = [("double qkv (image + cond)", 2048, 3264, 9216, 19), ("double qkv (text)", 512, 3072, 9216, 19),
          ("double out (image + cond)", 2048, 3136, 3072, 19), ("double out (text)", 512, 3072, 3072, 19),
          ("double ff up (image + cond)", 2048, 3072, 12288, 19), ("double ff down (image + cond)", 2048, 12352,
                                                                   3072, 19),
          ("double ff up (text)", 512, 3072, 12288, 19), ("double ff down (text)", 512, 12288, 3072, 19),
          ("single qkv + mlp", 2560, 3328, 21504, 38), ("single proj_out", 2560, 15424, 3072, 38)]


def operands(m: int, k: int, n: int, granularity: str):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = (torch.randn(n, k, device="cuda") / k**0.5).to(torch.bfloat16)
    x8, sx = quantize_fp8(x, granularity)
    w8, sw = quantize_fp8(w, granularity)
    if granularity == "row":
        sx, sw = sx[:, None], sw[None, :]
    return x, w, x8, sx, w8, sw


def scaled(x8, sx, w8, sw, fast: bool) -> torch.Tensor:
    return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw, out_dtype=torch.bfloat16, use_fast_accum=fast)


def main() -> None:
    args = probe_arguments(__doc__)
    flops = sum(2 * m * k * n * count for _, m, k, n, count in SHAPES)
    print(f"{device_line()}; {flops / 1e12:.2f} TFLOP of fp8 GEMMs per pass")
    data = {g: [operands(m, k, n, g) for _, m, k, n, _ in SHAPES] for g in ("row", "tensor")}
    variants = {"bf16 F.linear": [lambda x=x, w=w: F.linear(x, w) for x, w, *_ in data["row"]]}
    for granularity in ("row", "tensor"):
        for fast in (False, True):
            name = f"fp8 {granularity}-wise, use_fast_accum={fast}"
            variants[name] = [lambda o=o, f=fast: scaled(*o[2:], f) for o in data[granularity]]
    print(f"\n{'variant':40s} {'ms / pass':>10s} {'TFLOP/s':>8s}")
    for name, calls in variants.items():
        per_pass = [call for call, (*_, count) in zip(calls, SHAPES, strict=True) for _ in range(count)]
        ms = graphed_ms(per_pass, args.replays)
        print(f"{name:40s} {ms:10.2f} {flops / ms / 1e9:8.0f}")
    print("\nper shape, row-wise: ms per call (slow / fast accum), rel. L2 error vs fp32 on the same e4m3 operands "
          "(slow / fast) and vs the bf16 product (fast)")
    for (name, *_), (x, w, *quantised) in zip(SHAPES, data["row"], strict=True):
        x8, sx, w8, sw = quantised
        exact = (x8.float() * sx) @ (w8.float() * sw.t()).t()  # sw: (1, N) row-wise
        slow_ms, fast_ms = (graphed_ms([lambda f=f, q=quantised: scaled(*q, f)], args.replays * 5)
                            for f in (False, True))
        slow, fast = (scaled(*quantised, f) for f in (False, True))
        errors = f"{relative_l2(slow, exact):.2e} / {relative_l2(fast, exact):.2e}"
        print(f"{name:32s} {slow_ms:7.3f} / {fast_ms:7.3f} ms  {errors}  "
              f"{relative_l2(fast, F.linear(x, w)):.2e}")


if __name__ == "__main__":
    main()
