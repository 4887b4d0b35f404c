"""The options of ``appleswap bench`` (one frozen dataclass: flags, config file and defaults in one place)."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Literal

from appleswap.config import option


@dataclasses.dataclass(frozen=True)
class BenchConfig:
    tiny: bool = option(False, "tiny config (CPU smoke test of the benchmark itself)")
    steps: int = option(28, "sampling steps of a swap")
    batch: int = option(4, "images per call for the batched images/s row", flag="batch-size")
    repeats: int = option(5, "timed repeats per row (median reported)")
    text_tokens: int = option(512, "T5 tokens (512 in APPLE)")
    sdpa: Literal["auto", "flash", "efficient", "cudnn", "math", "fastest"] = option(
        "fastest", "attention kernel for the swaps: a named backend, or the fastest in the per-pass rows")
    compile: bool = option(False, "also time regional torch.compile of the plain and the APPLE forward, and compiled "
                                  "swaps (and compiled fp8 with --fp8)")
    compile_mode: str = option("default", "torch.compile mode (default, reduce-overhead, max-autotune-no-cudagraphs)")
    eager_swaps: bool = option(True, "time eager student / teacher / batched swaps")
    cuda_graphs: bool = option(True, "compiled rows replay each pass as one CUDA graph (GPU only)")
    only_tiers: bool = option(False, "after the baseline passes, only the fp8 / offload tiers (no bf16 A/B, swaps, "
                                     "compile, training or KV rows): the second half of a table split over two runs")
    kv_cache: bool = option(True, "also time the independent-condition mode with its once-per-swap KV cache")
    train: bool = option(True, "time one LoRA training step (r64, gradient checkpointing)")
    lora_rank: int = option(64, "LoRA rank")
    fp8: bool = option(True, "also quantise the blocks to fp8 at the end and time pass, swaps and peak memory")
    offload: bool = option(True, "also time the offload tiers (model, sequential) and their peak memory")
    output: Path | None = option(None, "also write the table as JSON here", short="-o")

