"""Issue 4: seconds per optimizer step and peak memory of the full teacher training step, swept over batch size.

Everything a real step pays for, with random weights built on the device (no downloads): the full FLUX.1
transformer in bf16 with 20 PuLID ID cross-attentions and a fresh rank-64 LoRA on APPLE's target modules (fp32,
the only trainable tensors, through ``train.build.prepare_lora`` with gradient checkpointing), the FLUX VAE
architecture (diffusers config values of FLUX's ``vae``), the ID-loss network (SimSwap ArcFace or IR-SE50) and
LPIPS-VGG, all driven by the real ``train.teacher.training_step`` with AdamW. The ID and LPIPS gates are set to
t <= 1 so every sample decodes and pays for both losses (the worst case of a real step).

The sweep (1, 2, 4, 8, 12, 16, ...) stops at the first ``torch.OutOfMemoryError`` and reports the largest batch
that fit. ``--memory-cap-gib`` limits this process's share of a bigger card (an H100 80GB has 79.6 GiB), so the
"largest batch on an 80 GB card" can be read off an H200 too. ``--tiny --device cpu`` runs the same code path on
a tiny config (CPU smoke test of the benchmark itself).

    PYTHONPATH=src python benchmarks/bench_train_step.py --repeats 3 --memory-cap-gib 79.6
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import logging
import statistics
import sys
import time
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("appleswap.bench_train_step")
FULL_ID_DIM, TINY_ID_DIM = 2048, 64


@dataclasses.dataclass
class BatchRow:
    """One line of the table; ``seconds`` is None where the batch ran out of memory."""

    batch: int
    seconds: float | None = None
    peak_gib: float = float("nan")
    note: str = ""

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.seconds if self.seconds else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test of the benchmark)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--batches", default=None,
                        help="comma-separated batch sizes (default: 1,2,4,8 then every 4 up to --max-batch)")
    parser.add_argument("--max-batch", type=int, default=64, help="last batch size of the default sweep")
    parser.add_argument("--repeats", type=int, default=3, help="timed steps per batch size (median reported)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per batch size before timing")
    parser.add_argument("--lora-rank", type=int, default=64, help="LoRA rank (alpha = rank)")
    parser.add_argument("--id-net", choices=("arcface", "irse50"), default="arcface",
                        help="ID-loss network: SimSwap ArcFace (the paper's) or IR-SE50")
    parser.add_argument("--arcface-layers", default="3,4,23,3",
                        help="IR blocks per stage of the SimSwap ArcFace (its checkpoint decides; 2,2,2,2 = ResNet18)")
    parser.add_argument("--memory-cap-gib", type=float, default=None,
                        help="limit this process to this many GiB of the card (e.g. 79.6 = an H100 80GB)")
    parser.add_argument("--text-tokens", type=int, default=512, help="T5 tokens (512 in APPLE)")
    parser.add_argument("--time-budget-s", type=float, default=None,
                        help="start no new batch size after this many seconds (so the table prints in time)")
    parser.add_argument("--log-level", default="INFO", help="logging level")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.warmup < 0:
        parser.error("--repeats must be >= 1 and --warmup >= 0")
    return args


def batch_sizes(spec: str | None, max_batch: int) -> list[int]:
    """Explicit list, or 1, 2, 4, 8, 12, 16, ... up to ``max_batch``."""
    if spec:
        sizes = [int(part) for part in spec.split(",") if part.strip()]
        if not sizes or min(sizes) < 1:
            raise ValueError(f"--batches {spec!r}: give positive integers, e.g. 1,2,4")
        return sizes
    return [b for b in (1, 2, 4) if b <= max_batch] + list(range(8, max_batch + 1, 4))


def build_transformer(tiny: bool, rank: int, device: Any, dtype: Any) -> tuple[Any, Any]:
    """(AppleTransformer with random ID-CAs and a trainable fp32 LoRA + checkpointing, VAE), random weights."""
    from appleswap.bench import BenchConfig, build_models
    from appleswap.bench_utils import init_random_
    from appleswap.model.id_attention import build_id_attentions, id_attention_layout
    from appleswap.model.transformer import AppleTransformer
    from appleswap.train.build import prepare_lora
    from appleswap.train.config import TrainConfig

    flux, vae = build_models(BenchConfig(tiny=tiny), device, dtype)
    doubles, singles = id_attention_layout(len(flux.transformer_blocks), len(flux.single_transformer_blocks))
    heads, head_dim = (2, 16) if tiny else (16, 128)  # PuLID: 16 x 128 = 2048 inner
    attentions = build_id_attentions(len(doubles) + len(singles), flux.inner_dim,
                                     TINY_ID_DIM if tiny else FULL_ID_DIM, heads, head_dim)
    attentions = attentions.to(device=device, dtype=dtype)
    init_random_(attentions, seed=1)
    model = AppleTransformer(flux, attentions)
    prepare_lora(model, TrainConfig(lora_rank=rank, lora_alpha=float(rank), gradient_checkpointing=True))
    model.flux.to(device)  # the LoRA tensors, wherever PEFT created them (no dtype change: they stay fp32)
    return model, vae


def build_loss_networks(tiny: bool, id_net: str, device: Any, layers: tuple[int, ...] = (3, 4, 23, 3)) \
        -> tuple[Any, Any]:
    """(IdentityLoss on a random ArcFace / IR-SE50, random LPIPS-VGG), fp32 and frozen as in training."""
    import lpips
    import torch

    from appleswap.eval.arcface import IRSE50
    from appleswap.train.arcface import ArcFaceResNet
    from appleswap.train.losses import IdentityLoss

    if id_net == "arcface":
        net, imagenet_norm = ArcFaceResNet((1, 1, 1, 1) if tiny else layers), True
    else:
        net, imagenet_norm = (IRSE50((1, 1), (16, 32)) if tiny else IRSE50()), False
    id_loss = IdentityLoss(net.to(device).eval(), imagenet_norm=imagenet_norm).to(device)
    # pretrained=False / pnet_rand=True: the LPIPS-VGG architecture with random trunk and heads, nothing read
    lpips_net = lpips.LPIPS(net="vgg", pretrained=False, pnet_rand=True, verbose=False)
    with torch.no_grad():  # the released heads are non-negative (a distance >= 0); random ones need not be
        for lin in lpips_net.lins:
            lin.model[-1].weight.abs_()
    return id_loss, lpips_net.to(device).eval().requires_grad_(False)


def random_text(flux: Any, tokens: int, device: Any, dtype: Any) -> Any:
    import torch

    from appleswap.model.transformer import TextEmbeddings

    generator = torch.Generator().manual_seed(3)
    embeds = torch.randn(1, tokens, flux.config.joint_attention_dim, generator=generator)
    pooled = torch.randn(1, flux.config.pooled_projection_dim, generator=generator)
    return TextEmbeddings(embeds.to(device, dtype), pooled.to(device, dtype), torch.zeros(tokens, 3, device=device))


def build_parts(args: argparse.Namespace, device: Any) -> Any:
    """The TrainParts of a full-size (or tiny) teacher run, random weights everywhere."""
    import torch

    from appleswap.train.teacher import TrainParts

    dtype = torch.float32 if args.tiny else torch.bfloat16
    transformer, vae = build_transformer(args.tiny, args.lora_rank, device, dtype)
    text_len = 8 if args.tiny else args.text_tokens
    text = random_text(transformer.flux, text_len, device, dtype)
    empty = dataclasses.replace(text, prompt_embeds=text.prompt_embeds.flip(1), pooled=-text.pooled)
    layers = tuple(int(n) for n in args.arcface_layers.split(","))
    if len(layers) != 4 or min(layers) < 1:
        raise ValueError(f"--arcface-layers {args.arcface_layers!r}: give 4 positive block counts, e.g. 3,4,23,3")
    id_loss, lpips_net = build_loss_networks(args.tiny, args.id_net, device, layers)
    return TrainParts(transformer, vae, text, empty, id_loss, lpips_net)


def sync(device: Any) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_batch(parts: Any, optimizer: Any, batch_size: int, args: argparse.Namespace, device: Any) -> BatchRow:
    """Warm-up steps, then the median of ``repeats`` timed optimizer steps and the peak memory of them all."""
    import torch

    from appleswap.train.teacher import LossSettings, example_batch, training_step

    settings = LossSettings(id_loss_max_t=1.0, lpips_max_t=1.0)  # every sample pays for ID + LPIPS
    resolution, id_dim = (64, TINY_ID_DIM) if args.tiny else (512, FULL_ID_DIM)
    batch = example_batch(batch_size, resolution, id_dim, seed=batch_size)
    cuda = torch.device(device).type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for _ in range(args.warmup):
        training_step(parts, batch, settings, optimizer)
    sync(device)
    times, logs = [], {}
    for _ in range(args.repeats):
        start = time.perf_counter()
        logs = training_step(parts, batch, settings, optimizer)
        sync(device)
        times.append(time.perf_counter() - start)
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    note = (f"loss fm {logs['loss/fm']:.3g}, id {logs.get('loss/id', float('nan')):.3g}, "
            f"lpips {logs.get('loss/lpips', float('nan')):.3g}")
    return BatchRow(batch_size, statistics.median(times), peak, note)


def free_after_oom(optimizer: Any, device: Any) -> None:
    """Drop gradients and cached blocks left by a failed step (called outside the ``except`` block)."""
    import torch

    optimizer.zero_grad(set_to_none=True)
    gc.collect()
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def sweep(run_batch: Callable[[int], BatchRow], sizes: list[int], on_oom: Callable[[], None],
          deadline: float | None = None) -> list[BatchRow]:
    """Rows for ``sizes`` in order, ending with an OOM row at the first batch that runs out of memory (or a
    'not run' row once ``deadline``, a ``time.perf_counter()`` value, has passed)."""
    import torch

    rows: list[BatchRow] = []
    for size in sizes:
        if deadline is not None and time.perf_counter() > deadline:
            rows.append(BatchRow(size, None, float("nan"), "not run: --time-budget-s reached"))
            break
        failed = False
        try:
            rows.append(run_batch(size))
        except torch.OutOfMemoryError as error:
            logger.warning("batch %d: out of memory (%s)", size, str(error).splitlines()[0][:120])
            failed = True
        if failed:  # outside the handler, so the traceback's frames (and their tensors) are gone
            on_oom()
            rows.append(BatchRow(size, None, float("nan"), "out of memory"))
            break
        logger.info("batch %d: %.3f s/step, peak %.2f GiB", size, rows[-1].seconds, rows[-1].peak_gib)
    return rows


def ran_out_of_memory(rows: list[BatchRow]) -> bool:
    return bool(rows) and rows[-1].note == "out of memory"


def largest_fit(rows: list[BatchRow]) -> int:
    return max((row.batch for row in rows if row.seconds is not None), default=0)


def format_table(rows: list[BatchRow]) -> str:
    lines = ["| batch | s / step | samples / s | peak memory (GiB) | note |", "|---|---|---|---|---|"]
    for row in rows:
        if row.seconds is None:
            status = "OOM" if row.note == "out of memory" else "-"
            lines.append(f"| {row.batch} | {status} | - | - | {row.note} |")
        else:
            lines.append(f"| {row.batch} | {row.seconds:.3f} | {row.samples_per_s:.3f} | {row.peak_gib:.2f} | "
                         f"{row.note} |")
    return "\n".join(lines)


def card_summary(device: Any, cap_gib: float | None) -> str:
    """The card's name and memory, and the cap in force; applies the cap (if it is below the card's size)."""
    import torch

    if torch.device(device).type != "cuda":
        return "cpu (no memory figures)"
    props = torch.cuda.get_device_properties(device)
    total = props.total_memory / 2**30
    text = f"{props.name}, {total:.1f} GiB"
    if cap_gib is not None and cap_gib < total:
        torch.cuda.set_per_process_memory_fraction(cap_gib / total, device)
        text += f", capped at {cap_gib:.1f} GiB (set_per_process_memory_fraction {cap_gib / total:.4f})"
    elif cap_gib is not None:
        text += f", no cap applied (--memory-cap-gib {cap_gib} >= the card)"
    return text


def environment() -> str:
    import diffusers
    import peft
    import torch

    return f"torch {torch.__version__}, diffusers {diffusers.__version__}, peft {peft.__version__}"


def run(args: argparse.Namespace) -> tuple[list[BatchRow], str]:
    """Build once, sweep the batch sizes; returns the rows and the header line."""
    import torch

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward crashed at these shapes (gpu_notes)
        torch.backends.cuda.matmul.allow_tf32 = True
    card = card_summary(device, args.memory_cap_gib)
    start = time.perf_counter()
    deadline = start + args.time_budget_s if args.time_budget_s else None
    parts = build_parts(args, device)
    params = [p for p in parts.transformer.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)
    build_s = time.perf_counter() - start
    weights = torch.cuda.memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")
    trainable = sum(p.numel() for p in params) / 1e6
    logger.info("built in %.1f s: %.1f M trainable, %.2f GiB allocated", build_s, trainable, weights)
    rows = sweep(lambda b: time_batch(parts, optimizer, b, args, device), batch_sizes(args.batches, args.max_batch),
                 lambda: free_after_oom(optimizer, device), deadline)
    id_name = f"arcface {'1,1,1,1' if args.tiny else args.arcface_layers}" if args.id_net == "arcface" else "irse50"
    header = (f"APPLE teacher training step ({'tiny' if args.tiny else 'full FLUX.1'} config, random weights): "
              f"{card}; {environment()}; LoRA r{args.lora_rank} ({trainable:.1f} M "
              f"trainable, fp32), gradient checkpointing, ID loss ({id_name}) + LPIPS-VGG on every sample, "
              f"AdamW; median of {args.repeats} after {args.warmup} warm-up; weights {weights:.2f} GiB")
    return rows, header


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    rows, header = run(args)
    print(header)
    print(format_table(rows))
    stopped = "stopped at the first OOM" if ran_out_of_memory(rows) else "no OOM in the sweep"
    print(f"largest batch that fit: {largest_fit(rows)} ({stopped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
