"""GPU check of the Triton kernels (:mod:`appleswap.model.kernels`) at FLUX's sizes: each against its reference
torch code compiled by inductor (what runs without the kernels): agreement (share of equal values, largest
difference) and time per call. Prints one table. CUDA only.

    PYTHONPATH=src python benchmarks/check_kernels.py
"""

from __future__ import annotations

import torch
from torch import nn

from appleswap.bench_utils import Rows, graphed_ms
from appleswap.model import kernels
from appleswap.model.fp8 import quantize_activation_rows


def graph_time(fn, repeats: int = 50) -> float:
    """Microseconds per call of ``fn`` replayed from a CUDA graph (no host overhead in the figure)."""
    return graphed_ms([fn], repeats) * 1e3


def _agreement(got: torch.Tensor, ref: torch.Tensor) -> str:
    got, ref = got.float(), ref.float()
    return f"equal {float((got == ref).float().mean()):.4f}, max |diff| {float((got - ref).abs().max()):.3g}"


def check_qk_norm_rope(rows: Rows, device: str, text: int = 512, image: int = 2048, heads: int = 24, dim: int = 128):
    width = heads * dim
    text_out = torch.randn(1, text, 3 * width + 192, device=device, dtype=torch.bfloat16)
    image_out = torch.randn(1, image, 3 * width + 192, device=device, dtype=torch.bfloat16)
    norms = [nn.RMSNorm(dim, eps=1e-6).to(device, torch.bfloat16) for _ in range(4)]
    for norm in norms:
        nn.init.uniform_(norm.weight, 0.5, 1.5)
    angles = torch.rand(text + image, dim // 2, device=device) * 6
    rotary = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    q, k = [text_out[..., :width], image_out[..., :width]], [text_out[..., width:2 * width], image_out[..., width:2 * width]]
    args = (q, k, norms[:2], norms[2:], rotary, dim)
    reference = torch.compile(kernels.qk_norm_rope_reference, fullgraph=True)
    with torch.no_grad():
        ref, got = reference(*args), kernels.qk_norm_rope(*args)
        rows.add("qk_norm_rope, double block (512 + 2048 tokens): agreement", 0, "", _agreement(got[0], ref[0]))
        rows.add("qk_norm_rope: Triton kernel", graph_time(lambda: kernels.qk_norm_rope(*args)), "us",
                 "")
        rows.add("qk_norm_rope: reference, torch.compile", graph_time(lambda: reference(*args)),
                 "us", "")


def check_join_rows(rows: Rows, device: str, tokens: int = 2560, cond: int = 1024):
    attn = torch.randn(1, tokens, 3072, device=device, dtype=torch.bfloat16)
    mlp = torch.randn(1, tokens, 12288, device=device, dtype=torch.bfloat16) * 2
    z = torch.randn(1, cond, 64, device=device, dtype=torch.bfloat16)
    x = kernels.ConcatInput((attn, mlp), (None, "tanh"), z)
    width = 3072 + 12288 + 64

    def reference(attn, mlp, z, quantize):
        joined = kernels.ConcatInput((attn, mlp), (None, "tanh"), z).join(width)
        return quantize_activation_rows(joined.reshape(-1, width)) if quantize else (joined, None)

    compiled = torch.compile(reference, fullgraph=True)
    with torch.no_grad():
        for quantize in (False, True):
            label = "fp8 (row amax, e4m3, scales)" if quantize else "bf16"
            ref, got = compiled(attn, mlp, z, quantize), kernels.join_rows(x, width, quantize)
            note = _agreement(got[0].reshape(ref[0].shape), ref[0])
            if quantize:
                note += f"; scales {_agreement(got[1], ref[1])}"
            rows.add(f"join_rows [attn | gelu(mlp) | z], single block, {label}: agreement", 0, "", note)
            rows.add(f"join_rows {label}: Triton kernel",
                     graph_time(lambda q=quantize: kernels.join_rows(x, width, q)), "us", "")
            rows.add(f"join_rows {label}: reference, torch.compile",
                     graph_time(lambda q=quantize: compiled(attn, mlp, z, q)), "us", "")


def check_compiled_join(rows: Rows, device: str, tokens: int = 2048, cond: int = 1024):
    """The kernel inside a compiled graph (inductor inlines user Triton kernels), one and two pieces."""
    ff = torch.randn(1, tokens, 12288, device=device, dtype=torch.bfloat16)
    z = torch.randn(1, cond, 64, device=device, dtype=torch.bfloat16)
    for quantize in (False, True):
        fn = torch.compile(lambda ff, z, q=quantize: kernels.join_rows(
            kernels.ConcatInput((ff,), ("tanh",), z), 12352, q)[0], fullgraph=True)
        try:
            with torch.no_grad():
                got = fn(ff, z)
                ref = kernels.join_rows(kernels.ConcatInput((ff,), ("tanh",), z), 12352, quantize)[0]
            note = _agreement(got, ref)
        except Exception as error:  # noqa: BLE001 - a check script reports and goes on
            note = f"FAILED: {type(error).__name__}: {str(error)[-400:]}"
        rows.add(f"join_rows [gelu(ff) | z] compiled, quantize={quantize}", 0, "", note)


def main() -> None:
    rows = Rows()
    torch.manual_seed(0)
    check_qk_norm_rope(rows, "cuda")
    check_join_rows(rows, "cuda")
    check_compiled_join(rows, "cuda")
    print(rows.table())


if __name__ == "__main__":
    main()
