"""Would merged condition weights beat the folded LoRA in fp8 (issue 6)? The condition LoRA acts on condition rows
only. The pass folds it into each GEMM: ``[x | z] [W | B]^T`` with ``z = s A x`` on the condition rows, so one GEMM
covers all rows, at the price of ``r`` more reduction columns and the ``z`` products (bf16, split-K). The
alternative keeps a second fp8 weight ``W' = W + s B A`` for the condition rows and runs two GEMMs over row slices
of the same quantised input, each writing its rows of one output: no ``z``, no extra columns, but smaller GEMMs.
Optionally the condition rows' GEMM runs on a second stream, beside the other rows'.

This probe times the GEMMs of one pass (19 double and 38 single blocks) each way, replayed as one CUDA graph. The
folded variant includes the ``z`` products but not the GELU + concatenation that writes their input for
``proj_out`` and ``ff.net.2`` (~1.3 ms per pass in the profile), which the merged weights would also remove.

    PYTHONPATH=src python benchmarks/probe_condition_weights.py [--replays 20]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from appleswap.bench_utils import device_line, graphed_ms, probe_arguments, relative_l2
from appleswap.model.fp8 import quantize_fp8

# (name, calls per pass, rows without LoRA, condition rows, K, N, LoRA columns as folded)
SHAPES = [("double q/k/v (image + cond)", 19, 1024, 1024, 3072, 9216, 192),
          ("double to_out (image + cond)", 19, 1024, 1024, 3072, 3072, 64),
          ("double ff.net.2 (image + cond)", 19, 1024, 1024, 12288, 3072, 64),
          ("single q/k/v/mlp", 38, 1536, 1024, 3072, 21504, 256),
          ("single proj_out", 38, 1536, 1024, 15360, 3072, 64)]


def operands(main: int, cond: int, k: int, n: int, r: int):
    """Row-wise e4m3 input and weights for the folded and the merged forms, plus the bf16 ones for ``z``."""
    x = torch.randn(main + cond, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    lora_a = torch.randn(r, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    lora_b = torch.randn(n, r, device="cuda", dtype=torch.bfloat16) / r**0.5 * 0.1
    bias = torch.randn(n, device="cuda", dtype=torch.bfloat16) * 0.1
    z = F.pad(F.linear(x[main:], lora_a), (0, 0, main, 0))
    folded_x, folded_sx = quantize_fp8(torch.cat([x, z], 1), "row")
    folded_w, folded_sw = quantize_fp8(torch.cat([w, lora_b], 1), "row")
    x8, sx = quantize_fp8(x, "row")
    w8, sw = quantize_fp8(w, "row")
    merged8, merged_s = quantize_fp8(w + lora_b @ lora_a, "row")
    return {"x": x, "lora_a": lora_a, "bias": bias,
            "folded": (folded_x, folded_sx[:, None], folded_w, folded_sw[None]),
            "base": (x8, sx[:, None], w8, sw[None]), "merged": (merged8, merged_s[None])}


def calls(main: int, cond: int, k: int, n: int, r: int):
    """(folded, split, split on two streams) calls and the split product's rel. L2 to the folded one."""
    ops = operands(main, cond, k, n, r)
    out = torch.empty(main + cond, n, device="cuda", dtype=torch.bfloat16)
    side = torch.cuda.Stream()

    def folded():
        F.linear(ops["x"][main:], ops["lora_a"])  # z's product (bf16, as the pass runs it)
        a, sa, b, sb = ops["folded"]
        return torch._scaled_mm(a, b.t(), scale_a=sa, scale_b=sb, bias=ops["bias"], out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    def part(rows: slice, weight, scale):
        a, sa, *_ = ops["base"]
        torch._scaled_mm(a[rows], weight.t(), scale_a=sa[rows], scale_b=scale, bias=ops["bias"],
                         out_dtype=torch.bfloat16, use_fast_accum=True, out=out[rows])

    def split():
        part(slice(0, main), *ops["base"][2:])
        part(slice(main, None), *ops["merged"])
        return out

    def streams():
        side.wait_stream(torch.cuda.current_stream())
        part(slice(0, main), *ops["base"][2:])
        with torch.cuda.stream(side):
            part(slice(main, None), *ops["merged"])
        torch.cuda.current_stream().wait_stream(side)
        return out

    return folded, split, streams, relative_l2(split(), folded())


def main() -> None:
    args = probe_arguments(__doc__)
    print(device_line())
    print(f"\n{'GEMM (per pass)':32s} {'folded + z':>11s} {'merged, 2 GEMMs':>16s} {'2 streams':>10s} {'rel. L2':>9s}"
          "  (ms per pass)")
    totals = [0.0, 0.0, 0.0]
    for name, count, *shape in SHAPES:
        *variants, error = calls(*shape)
        times = [graphed_ms([call] * count, args.replays) for call in variants]
        totals = [t + s for t, s in zip(totals, times, strict=True)]
        print(f"{name:32s} {times[0]:11.3f} {times[1]:16.3f} {times[2]:10.3f} {error:9.2e}")
    print(f"{'all':32s} {totals[0]:11.3f} {totals[1]:16.3f} {totals[2]:10.3f}")


if __name__ == "__main__":
    main()
