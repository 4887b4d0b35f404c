"""How close ``join_rows`` (the fp8 GEMM inputs, ``kernels.py``) runs to the memory bandwidth (issue 6): its four
uses in an fp8 pass at FLUX size, each replayed as a CUDA graph of its calls per pass, with the kernel's warps per
program as the variable; bytes moved are the pieces read plus the e4m3 row and its scale written. A bf16 copy of
the same bytes per call gives the bandwidth to compare with. Then the same for ``qk_norm_rope`` (tokens per program
and warps; bytes: queries and keys read and written).

    PYTHONPATH=src python benchmarks/probe_join_rows.py [--replays 20]
"""

from __future__ import annotations

import torch

from appleswap.bench_utils import device_line, graphed_ms, probe_arguments
from appleswap.model.kernels import launch_join_rows, launch_qk_norm_rope

COND = 1024  # condition rows (the tail z lives there)


def _kwargs(**kwargs):
    return kwargs


def uses():
    """(name, calls per pass, kwargs of launch_join_rows) of the fp8 pass at 512x512."""
    def bf16(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16)

    mod2048, mod2560 = bf16(1, 2, 3072) * 0.1, bf16(1, 2, 3072) * 0.1
    mlp = bf16(1, 2560, 21504)[..., 9216:]  # the MLP columns of the fused q/k/v/MLP output, as the pass reads them
    return [
        ("double q/k/v input (norm)", 19, _kwargs(a=bf16(1, 2048, 3072), b=None, tail=bf16(1, COND, 192), gelu_a=False,
                                               gelu_b=False, width=3264, quantize=True, shift=mod2048,
                                               scale=mod2048, split=1024, eps=1e-6)),
        ("single q/k/v/mlp input (norm)", 38, _kwargs(a=bf16(1, 2560, 3072), b=None, tail=bf16(1, COND, 256),
                                                   gelu_a=False, gelu_b=False, width=3328, quantize=True,
                                                   shift=mod2560, scale=mod2560, split=1536, eps=1e-6)),
        ("single proj_out input (gelu)", 38, _kwargs(a=bf16(1, 2560, 3072), b=mlp, tail=bf16(1, COND, 64), gelu_a=False,
                                                  gelu_b=True, width=15424, quantize=True)),
        ("double ff down input (gelu)", 19, _kwargs(a=bf16(1, 2048, 12288), b=None, tail=bf16(1, COND, 64), gelu_a=True,
                                                 gelu_b=False, width=12352, quantize=True)),
    ]


def moved_bytes(kwargs) -> int:
    pieces = [kwargs[k] for k in ("a", "b", "tail") if kwargs[k] is not None]
    rows = kwargs["a"].shape[1]
    return sum(p.shape[1] * p.shape[2] * 2 for p in pieces) + rows * (kwargs["width"] + 4)


def main() -> None:
    args = probe_arguments(__doc__, options=[("--warps", {"default": "0,4,8,16,32",
                                                          "help": "warps per program to try (0: the default)"})])
    warps = [int(w) for w in args.warps.split(",")]
    print(f"{device_line()}; GB/s = bytes read + written per call / time")
    print(f"\n{'use (calls per pass)':36s} {'MB':>6s} {'copy GB/s':>9s}  "
          + "  ".join(f"{'w' + str(w) if w else 'default':>15s}" for w in warps) + "   (us per call / GB/s)")
    best_total, default_total = 0.0, 0.0
    for name, count, kwargs in uses():
        size = moved_bytes(kwargs)
        source = torch.empty(size // 4, device="cuda", dtype=torch.bfloat16)
        target = torch.empty_like(source)
        copy_us = graphed_ms([lambda t=target, s=source: t.copy_(s)] * count, args.replays) / count * 1e3
        cells, times = [], []
        for w in warps:
            us = graphed_ms([lambda w=w, k=kwargs: launch_join_rows(**k, num_warps=w or None)] * count,
                            args.replays) / count * 1e3
            times.append(us)
            cells.append(f"{us:7.1f} / {size / us / 1e3:5.0f}")
        default_total += times[0] * count / 1e3
        best_total += min(times) * count / 1e3
        print(f"{name + f' ({count})':36s} {size / 1e6:6.1f} {size / copy_us / 1e3:9.0f}  " + "  ".join(cells))
    print(f"\nper pass: {default_total:.3f} ms with the first setting, {best_total:.3f} ms with each use's best")
    probe_qk_norm_rope(args.replays)


def qk_norm_rope_uses():
    """(name, calls per pass, q parts, k parts): the q and k columns of the fused projections' outputs."""
    single = torch.randn(1, 2560, 21504, device="cuda", dtype=torch.bfloat16)
    text, image = (torch.randn(1, n, 9216, device="cuda", dtype=torch.bfloat16) for n in (512, 2048))
    return [("single block q, k (2,560 tokens)", 38, [single[..., :3072]], [single[..., 3072:6144]]),
            ("double block q, k (512 + 2,048)", 19, [text[..., :3072], image[..., :3072]],
             [text[..., 3072:6144], image[..., 3072:6144]])]


def probe_qk_norm_rope(replays: int) -> None:
    weight = torch.ones(128, device="cuda", dtype=torch.bfloat16)
    angles = torch.rand(2560, 64, device="cuda") * 6
    cos, sin = angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1)
    settings = [(32, 4), (16, 2), (16, 4), (32, 2), (32, 8), (64, 4), (64, 8), (128, 8)]
    print(f"\n{'qk_norm_rope (calls per pass)':36s} {'MB':>6s}  " + "  ".join(f"{f't{t} w{w}':>15s}" for t, w in settings))
    first, best = 0.0, 0.0
    for name, count, q, k in qk_norm_rope_uses():
        size = sum(p.shape[1] for p in q) * 3072 * 2 * 4
        times = [graphed_ms([lambda t=t, w=w, q=q, k=k: launch_qk_norm_rope(
            q, k, [weight] * len(q), [weight] * len(q), cos, sin, 1e-6, 128, block=t, num_warps=w)] * count,
            replays) / count * 1e3 for t, w in settings]
        first, best = first + times[0] * count / 1e3, best + min(times) * count / 1e3
        print(f"{name + f' ({count})':36s} {size / 1e6:6.1f}  " + "  ".join(f"{us:7.1f} / {size / us / 1e3:5.0f}"
                                                                          for us in times))
    print(f"\nper pass: {first:.3f} ms with the first setting, {best:.3f} ms with each use's best")


if __name__ == "__main__":
    main()
