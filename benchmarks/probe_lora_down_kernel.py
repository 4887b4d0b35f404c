"""Tile sizes, warps, pipeline stages and reduction splits of the ``lora_down`` Triton kernel (issue 6): for each of
its four uses in a pass at FLUX size (1,024 condition rows), the time per call of every configuration, replayed as
a CUDA graph; prints the default's time and error against the torch reference, and the five best configurations.
Compile time grows with the grid: ~2 minutes on an H100 machine.

    PYTHONPATH=src python benchmarks/probe_lora_down_kernel.py [--replays 50]
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F
from lora_down_kernel import DEFAULT_CONFIG, NORM_CONFIG, launch_lora_down  # benchmarks/, next to this script

from appleswap.bench_utils import device_line, graphed_ms, probe_arguments, relative_l2
from appleswap.model.kernels import ConcatInput, RowModulation

COND = 1024


def uses():
    """(name, calls per pass, launch arguments) with inputs laid out as the pass has them."""
    def bf16(*shape, scale=1.0):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16) * scale

    def weights(rank, width):
        return bf16(rank, width, scale=width**-0.5), bf16(rank).abs()

    mod = bf16(1, 2, 2 * 3072, scale=0.3)
    shift, scale = mod.chunk(2, dim=-1)
    return [
        ("single proj_out [attn | gelu(mlp)] K 15360 r 64", 38,
         (bf16(1, 2560, 3072), bf16(1, 2560, 21504)[..., 9216:], False, True, *weights(64, 15360), 1536)),
        ("double ff.net.2 gelu(h) K 12288 r 64", 19, (bf16(1, 2048, 12288), None, True, False, *weights(64, 12288),
                                                      1024)),
        ("single q/k/v/mlp norm K 3072 r 256", 38, (bf16(1, 2560, 3072, scale=4), None, False, False,
                                                    *weights(256, 3072), 1536, shift, scale, 1, 1e-6)),
        ("double q/k/v norm K 3072 r 192", 19, (bf16(1, 2048, 3072, scale=4), None, False, False, *weights(192, 3072),
                                                1024, shift, scale, 1, 1e-6)),
    ]


def reference(launch) -> torch.Tensor:
    """The same z through torch: the condition rows joined (GELU or norm), then ``F.linear`` and the scale."""
    a, b, gelu_a, gelu_b, weight, lora_scale, start, *norm = launch
    parts, gelus = ((a,), ("tanh" if gelu_a else None,)) if b is None else ((a, b), (None, "tanh" if gelu_b else None))
    x = ConcatInput(parts, gelus, norm=RowModulation(norm[0], norm[1], start, norm[3]) if norm else None)
    return F.linear(x.rows(start), weight) * lora_scale


def configs(norm: bool, rank: int):
    if norm:
        grid = itertools.product((16, 32, 64), sorted({64, 128, min(256, rank)}), (64, 128), (4, 8), (3,), (0,))
    else:
        grid = itertools.product((64, 128), (64,), (64, 128), (4, 8), (3, 4), (264, 528))
    keys = ("block_m", "block_n", "block_k", "warps", "stages", "programs")
    return [dict(zip(keys, values, strict=True)) for values in grid]


def main() -> None:
    args = probe_arguments(__doc__, replays=50)
    print(f"{device_line()}; us per call")
    for name, count, launch in uses():
        norm = len(launch) > 7
        default_z = launch_lora_down(*launch).sum(0)
        torch_error = relative_l2(default_z, reference(launch))
        results = []
        for config in [NORM_CONFIG if norm else DEFAULT_CONFIG, *configs(norm, launch[4].shape[0])]:
            try:
                out = launch_lora_down(*launch, config=config)
                us = graphed_ms([lambda c=config, a=launch: launch_lora_down(*a, config=c)], args.replays) * 1e3
            except Exception as error:  # noqa: BLE001 - a configuration that does not compile is reported
                print(f"  {config}: {type(error).__name__}: {str(error)[:120]}")
                continue
            results.append((us, out.shape[0], relative_l2(out.sum(0), default_z), config))
        default_us = results[0][0]
        print(f"\n{name} ({count} per pass): default {default_us:.1f} us = {default_us * count / 1e3:.3f} ms per "
              f"pass; rel. L2 to the torch reference {torch_error:.1e}")
        for us, splits, error, config in sorted(results[1:], key=lambda r: r[0])[:5]:
            print(f"  {us:7.1f} us  splits {splits:2d}  rel. diff to default {error:.1e}  {config}")

if __name__ == "__main__":
    main()
