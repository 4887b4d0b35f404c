"""Measurement helpers of ``appleswap bench``: device-synchronised timing, the matmul ceiling, FLOP counting,
attention-kernel selection, random initialisation and the result table."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import statistics
import time

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

logger = logging.getLogger("appleswap.benchmark")


def sdpa_context(name: str, fallback: bool = False):
    """Only backend ``name`` (``fallback``: preferred, others allowed, for e.g. the VAE's 512-wide heads)."""
    backends = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
                "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}
    if name == "auto":
        return contextlib.nullcontext()
    if not fallback:
        return sdpa_kernel([backends[name]])
    order = [backends[name]] + [b for k, b in backends.items() if k != name]
    return sdpa_kernel(order, set_priority=True)



def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)



def time_call(fn, device, repeats: int, warmup: int = 1, samples: list | None = None) -> float:
    """Median wall seconds of ``fn()`` after ``warmup`` calls (device synchronised around each); every timing is
    appended to ``samples`` when given."""
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    if samples is not None:
        samples.extend(times)
    return statistics.median(times)



def relative_l2(a, b) -> float:
    """``|a - b| / |b|`` in fp32: how far an output is from its reference (the difference rows of the tables)."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm()).item()



def matmul_ceiling(device, dtype, size: int) -> float:
    """Measured FLOP/s of a size^3 matrix product on random data (the ceiling the fractions refer to)."""
    a, b = (torch.randn(size, size, device=device, dtype=dtype) for _ in range(2))
    seconds = time_call(lambda: a @ b, device, repeats=10, warmup=3)
    return 2 * size**3 / seconds



def init_random_(module, seed: int = 0) -> None:
    """Random weights in place: fan-in scaled normals for matrices, ones for norm scales, small biases."""
    generator = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in module.named_parameters():
            if param.ndim >= 2:
                fan_in = param[0].numel()
                param.normal_(0.0, fan_in**-0.5, generator=generator)
            elif "norm" in name and name.endswith("weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, 0.02, generator=generator)



@dataclasses.dataclass
class Rows:
    """The table: (name, value, unit, note) rows, printed at the end."""

    rows: list = dataclasses.field(default_factory=list)

    def add(self, name: str, value: float, unit: str, note: str = "") -> None:
        self.rows.append((name, value, unit, note))
        logger.info("%s: %.4g %s %s", name, value, unit, note)

    def table(self) -> str:
        width = max(len(r[0]) for r in self.rows)
        lines = [f"| {'measure'.ljust(width)} | value | unit | note |", f"|{'-' * (width + 2)}|---|---|---|"]
        lines += [f"| {n.ljust(width)} | {v:.4g} | {u} | {note} |" for n, v, u, note in self.rows]
        return "\n".join(lines)



def count_flops(fn) -> float:
    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return float(counter.get_total_flops())



def function_flops(model, fn) -> float:
    """FLOPs of ``fn`` counted with separate projections. The fused GEMMs' folded-LoRA columns hold zeros on all
    but the condition rows: work the GPU does, not work the function needs, so the fractions of the ceiling count
    the function's FLOPs (the same number for every variant). The fusion is restored as it was."""
    fold = model.fused_fold
    if fold is None:
        return count_flops(fn)
    model.unfuse_projections()
    try:
        return count_flops(fn)
    finally:
        model.fuse_projections(fold_lora=fold, condition_weights=model.fused_condition)



def backends_for(device) -> list[str]:
    return ["auto", "flash", "efficient", "cudnn"] if torch.device(device).type == "cuda" else ["auto"]



def time_backends(fn, device, repeats: int) -> dict[str, float]:
    times = {}
    for name in backends_for(device):
        try:
            with sdpa_context(name):
                times[name] = time_call(fn, device, repeats)
        except RuntimeError as error:  # backend unavailable for these shapes / this build
            logger.warning("SDPA %s unavailable: %s", name, str(error)[:100])
    return times
