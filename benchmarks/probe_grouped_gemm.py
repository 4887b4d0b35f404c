"""Would one grouped fp8 GEMM per double-block projection beat two (issue 6)? A double block multiplies its text
tokens (512 rows) and its image + condition tokens (2,048 rows) by different weights of the same shape, as two
``torch._scaled_mm`` calls; the 512-row ones leave most of their last wave idle (~1,000 TFLOP/s against ~1,400).
``torch._scaled_grouped_mm`` runs both in one kernel (K padded to the larger, no bias). This probe times, per pass
(19 double blocks) and replayed as one CUDA graph: the two calls with bias (the pass now), without bias, and the
grouped call; plus the 20 ID cross-attentions' bf16 GEMMs against fp8. (The log in ``round11/`` is from a version
whose two calls also concatenated their outputs, one copy more than the pass makes.)

    PYTHONPATH=src python benchmarks/probe_grouped_gemm.py [--replays 20]
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from appleswap.bench_utils import device_line, graphed_ms, probe_arguments, relative_l2
from appleswap.model.fp8 import quantize_activation_rows, quantize_fp8

# (name, K text, K image + cond (with the folded LoRA's columns), N) of the double blocks' projections
PAIRS = [("qkv", 3072, 3264, 9216), ("out", 3072, 3136, 3072), ("ff up", 3072, 3072, 12288),
         ("ff down", 12288, 12352, 3072)]
TEXT, IMAGE, BLOCKS = 512, 2048, 19
ID_SHAPES = [("ID to_q", 1024, 3072, 2048), ("ID to_out", 1024, 2048, 3072)]  # x 20 per pass


def fp8_operand(rows: int, k: int, columns: int | None = None):
    """Row-wise e4m3 values and scales of a random (rows, k) matrix, zero-padded to ``columns``."""
    x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) / (k**0.25)
    x8, scale = quantize_fp8(F.pad(x, (0, (columns or k) - k)), "row")
    return x8, scale


def pair_calls(k_text: int, k_image: int, n: int):
    """(separate with bias, separate without, grouped) calls and a check of grouped against separate."""
    a_t, s_t = fp8_operand(TEXT, k_text)
    a_i, s_i = fp8_operand(IMAGE, k_image)
    w_t, sw_t = fp8_operand(n, k_text)
    w_i, sw_i = fp8_operand(n, k_image)
    bias_t, bias_i = (torch.randn(n, device="cuda", dtype=torch.bfloat16) for _ in range(2))

    def separate(bias: bool):
        out_t = torch._scaled_mm(a_t, w_t.t(), scale_a=s_t[:, None], scale_b=sw_t[None], out_dtype=torch.bfloat16,
                                 bias=bias_t if bias else None, use_fast_accum=True)
        out_i = torch._scaled_mm(a_i, w_i.t(), scale_a=s_i[:, None], scale_b=sw_i[None], out_dtype=torch.bfloat16,
                                 bias=bias_i if bias else None, use_fast_accum=True)
        return out_t, out_i

    a_g = torch.cat([F.pad(a_t.view(torch.uint8), (0, k_image - k_text)), a_i.view(torch.uint8)]).view(a_t.dtype)
    s_g = torch.cat([s_t, s_i])
    w_g = torch.stack([F.pad(w_t.view(torch.uint8), (0, k_image - k_text)), w_i.view(torch.uint8)])
    w_g = w_g.view(a_t.dtype).transpose(-2, -1)  # (2, K, N), column-major
    sw_g = torch.stack([sw_t, sw_i])
    offs = torch.tensor([TEXT, TEXT + IMAGE], device="cuda", dtype=torch.int32)

    def grouped():
        return torch._scaled_grouped_mm(a_g, w_g, s_g, sw_g, offs=offs, out_dtype=torch.bfloat16,
                                        use_fast_accum=True)

    return (lambda: separate(True)), (lambda: separate(False)), grouped, relative_l2(grouped(), torch.cat(separate(False)))


def id_calls(m: int, k: int, n: int):
    x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5
    w8, sw = quantize_fp8(w, "row")

    def fp8():
        x8, sx = quantize_activation_rows(x)
        return torch._scaled_mm(x8, w8.t(), scale_a=sx, scale_b=sw[None], out_dtype=torch.bfloat16,
                                use_fast_accum=True)

    return (lambda: F.linear(x, w)), fp8, relative_l2(fp8(), F.linear(x, w))


def main() -> None:
    args = probe_arguments(__doc__)
    print(device_line())
    print(f"\n{'double-block pair (x 19)':26s} {'2 calls + bias':>15s} {'2 calls':>9s} {'grouped':>9s} "
          f"{'rel. L2':>9s}  (ms per pass)")
    totals = [0.0, 0.0, 0.0]
    for name, k_text, k_image, n in PAIRS:
        *calls, error = pair_calls(k_text, k_image, n)
        times = [graphed_ms([call] * BLOCKS, args.replays) for call in calls]
        totals = [t + s for t, s in zip(totals, times, strict=True)]
        print(f"{name:26s} {times[0]:15.3f} {times[1]:9.3f} {times[2]:9.3f} {error:9.2e}")
    print(f"{'all four':26s} {totals[0]:15.3f} {totals[1]:9.3f} {totals[2]:9.3f}")
    print(f"\n{'ID cross-attention (x 20)':26s} {'bf16':>9s} {'fp8 (eager quantise)':>21s} {'rel. L2':>9s}")
    for name, m, k, n in ID_SHAPES:
        bf16, fp8, error = id_calls(m, k, n)
        print(f"{name:26s} {graphed_ms([bf16] * 20, args.replays):9.3f} {graphed_ms([fp8] * 20, args.replays):21.3f} "
              f"{error:9.2e}")


if __name__ == "__main__":
    main()
