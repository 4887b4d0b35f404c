"""The teacher training step as it runs, against a plain diffusers + peft LoRA step of the same shape.

Everything a real step pays for, with random weights built on the device (no downloads): the full FLUX.1
transformer in bf16 with 20 PuLID ID cross-attentions and a fresh rank-64 LoRA on APPLE's target modules (fp32,
the only trainable tensors, through ``train.build.prepare_lora``), the FLUX VAE architecture, the ID-loss network
(SimSwap ArcFace or IR-SE50) and LPIPS-VGG, all driven by the real ``train.teacher.training_step`` with AdamW.

Recipes (``--recipes``, rows in this order):

* ``plain``: diffusers ``FluxTransformer2DModel`` + a peft LoRA (same targets, rank, fp32 LoRA), the same tokens
  (512 text + 2,048 image: the image and condition latents side by side), diffusers' gradient checkpointing,
  flow-matching MSE, AdamW. No VAE, no ID cross-attention, no auxiliary loss: the field's baseline step.
* ``worst``: APPLE's step with the ID and LPIPS gates forced open (every sample decodes and pays for both).
* ``paper``: the paper recipe as it runs: ID + LPIPS only where t <= 0.35 (logit-normal t: ~27 % of samples),
  10 % dropout of text / condition / ID; every block recomputed in backward, eager blocks, multi-tensor AdamW.
* ``fused``, ``blocks``, ``compiled``, ``partial``: the paper recipe plus, cumulatively, the fused AdamW, the
  regional torch.compile of the training blocks, the compiled VAE encoder (``compiled`` is what training's
  ``compile: true`` does), and gradient checkpointing on ``--checkpoint-fraction`` of the blocks.
* ``fp8``, ``fp8partial``: the compiled recipe with the frozen block linears in e4m3 (``fp8_base``:
  ``speed.fp8_training``, forward and input gradient as row-wise fp8 GEMMs; changes numerics), every block
  checkpointed, then checkpointing on ``--checkpoint-fraction`` of the blocks. The model is quantised in place
  before the first fp8 row (so the fp8 rows come last). Each fp8 row starts from the LoRA the reference row
  (``compiled``, else the last bf16 paper-recipe row) started from and runs the same steps (indices, seeds), so
  its note gives the mean absolute relative difference of the flow-matching loss to the reference row, step by step.
* ``budget``, ``fp8budget``: the compiled recipe (bf16 / fp8 base) with selective activation checkpointing by the
  compiler instead of whole-block recomputation: no block recomputed whole, each block graph keeps
  ``--memory-budget`` of its activations (``activation_memory_budget``) and recomputes the cheapest rest.
* ``fp8recompute``: ``fp8budget`` with ``recompute_aux_losses``: the ID / LPIPS decode of each gated sample is
  recomputed in backward, one sample at a time, so the peak does not grow with the number of gated samples.
* ``fp8lean``: ``fp8budget`` without the transposed e4m3 copies (``fp8_transposed_copy: false``, 11 GiB less at
  FLUX size, dropped in place: so it comes after the other fp8 rows), at ``--lean-memory-budget``.

``--all-gated`` opens the ID and LPIPS gates for every sample of every APPLE row (as ``worst`` does): the peak of
the step where a whole batch draws t <= 0.35, which the paper recipe's random t reaches now and then.

``--profile`` adds, per row, where the GPU time of two more steps goes (GEMMs, fp8 GEMMs, attention, inductor's
fused kernels, convolutions of the VAE and loss networks, the optimizer, copies, idle) and the top kernels of the
first row.

Each row is the mean over ``--repeats`` steps on different batches (so the t <= 0.35 gate opens as often as in
training) after ``--warmup`` steps; the fraction of the bf16 ceiling counts the transformer's model FLOPs (forward
+ the input-gradient backward, no recomputation; measured with FlopCounterMode) against a matmul measured in the
same run. ``--loader`` times the real data loader (JPEG/PNG decoding of the preprocessed layout, ID tokens) on
CPU workers. ``--sweep`` finds the largest batch of the last recipe.

    PYTHONPATH=src python benchmarks/bench_train_step.py --batch 4 --repeats 6 --loader
    PYTHONPATH=src python benchmarks/bench_train_step.py --tiny --device cpu --recipes paper,partial --repeats 1
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
from pathlib import Path
from typing import Any

logger = logging.getLogger("appleswap.bench_train_step")
FULL_ID_DIM, TINY_ID_DIM = 2048, 64
RECIPES = ("plain", "worst", "paper", "fused", "blocks", "compiled", "partial", "budget", "fp8", "fp8partial", "fp8budget",
           "fp8recompute", "fp8lean")
FP8_RECIPES = ("fp8", "fp8partial", "fp8budget", "fp8recompute", "fp8lean")
BUDGET_RECIPES = ("budget", "fp8budget", "fp8recompute", "fp8lean")
COMPILED_RECIPES = ("blocks", "compiled", "partial", *BUDGET_RECIPES, *FP8_RECIPES)


@dataclasses.dataclass
class BatchRow:
    """One line of the table; ``seconds`` is None where the batch ran out of memory."""

    batch: int
    seconds: float | None = None
    peak_gib: float = float("nan")
    note: str = ""
    recipe: str = ""
    fraction: float = float("nan")

    @property
    def samples_per_s(self) -> float:
        return self.batch / self.seconds if self.seconds else float("nan")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config (CPU smoke test of the benchmark)")
    parser.add_argument("--device", default=None, help="cuda, cuda:1, cpu (default: cuda when available)")
    parser.add_argument("--recipes", default=",".join(RECIPES),
                        help=f"comma-separated rows, in order (default: all of {', '.join(RECIPES)})")
    parser.add_argument("--batch", type=int, default=4, help="batch of the recipe rows")
    parser.add_argument("--checkpoint-fraction", type=float, default=0.5,
                        help="share of the blocks recomputed in backward in the 'partial' and 'fp8partial' rows")
    parser.add_argument("--memory-budget", type=float, default=0.3,
                        help="share of each block's activations kept in the 'budget' and 'fp8budget' rows")
    parser.add_argument("--lean-memory-budget", type=float, default=0.5,
                        help="share of each block's activations kept in the 'fp8lean' row")
    parser.add_argument("--all-gated", action="store_true",
                        help="open the ID/LPIPS gates for every sample of every APPLE row (worst-case peak memory)")
    parser.add_argument("--profile", action="store_true", help="also profile two steps of every row (GPU time)")
    parser.add_argument("--sweep", action="store_true",
                        help="after the rows, the last recipe over larger batches up to the first OOM")
    parser.add_argument("--batches", default=None,
                        help="--sweep's batch sizes, comma-separated (default: 1,2,4,8 then every 4 up to --max-batch)")
    parser.add_argument("--max-batch", type=int, default=64, help="last batch size of the default sweep")
    parser.add_argument("--repeats", type=int, default=6, help="timed steps per row (mean; each on new indices)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per row before timing (compiles)")
    parser.add_argument("--loader", action="store_true", help="also time the real data loader on CPU workers")
    parser.add_argument("--loader-workers", type=int, default=8, help="DataLoader workers of --loader")
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
    from appleswap.benchmark.models import BenchConfig, build_models
    from appleswap.benchmark.utils import init_random_
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

    from appleswap.face_metrics.arcface import IRSE50
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



def paper_batch(batch_size: int, resolution: int, id_dim: int, start: int, dropout: bool = True) -> dict[str, Any]:
    """A batch of dataset indices ``start..``, with the training dropouts drawn as the dataset draws them."""
    import random

    import torch

    from appleswap.train.data import Dropout, apply_dropout
    from appleswap.train.teacher import example_batch

    batch = example_batch(batch_size, resolution, id_dim, seed=start)
    batch["index"] = torch.arange(start, start + batch_size)
    if dropout:
        null = torch.zeros(32, id_dim)
        for i in range(batch_size):
            sample = {key: batch[key][i] for key in ("condition", "id_tokens")}
            apply_dropout(sample, Dropout().draw(random.Random(f"0:0:{start + i}:drop")), null)
            batch["drop_text"][i] = sample["drop_text"]
            batch["condition"][i], batch["id_tokens"][i] = sample["condition"], sample["id_tokens"]
    return batch


def time_steps(step: Callable[[int], dict], batch_size: int, args: argparse.Namespace, device: Any, label: str,
               flops_per_sample: float, ceiling: float) -> BatchRow:
    """Warm-up steps, then the mean of ``repeats`` steps (each on new indices) and the peak memory of them all."""
    import torch

    cuda = torch.device(device).type == "cuda"
    if hasattr(step, "prepare"):  # the batches, built before the clock starts (training's loader workers do this)
        step.prepare([10_000 + n * batch_size for n in range(args.warmup)] + [n * batch_size
                                                                              for n in range(args.repeats)])
    if cuda:
        torch.cuda.reset_peak_memory_stats(device)
    for n in range(args.warmup):
        step(10_000 + n * batch_size)
    sync(device)
    start, gated, logs = time.perf_counter(), [], {}
    for n in range(args.repeats):
        logs = step(n * batch_size)
        gated.append(logs.get("gated", float("nan")))
    sync(device)
    seconds = (time.perf_counter() - start) / args.repeats
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if cuda else float("nan")
    fraction = flops_per_sample * batch_size / seconds / ceiling if ceiling else float("nan")
    note = ", ".join(f"{key.removeprefix('loss/')} {logs[key]:.3g}" for key in ("loss/fm", "loss/id", "loss/lpips")
                     if key in logs)
    if "gated" in logs:
        note = f"{statistics.fmean(gated):.0%} of samples through ID + LPIPS; last loss {note}"
    return BatchRow(batch_size, seconds, peak, note, label, fraction)


def apple_step(parts: Any, optimizer: Any, settings: Any, batch_size: int, args: argparse.Namespace,
               fm_losses: list[float] | None = None):
    """One training step on the batch at a start index; appends each step's flow-matching loss to ``fm_losses``."""
    from appleswap.train.teacher import training_step

    resolution, id_dim = (64, TINY_ID_DIM) if args.tiny else (512, FULL_ID_DIM)
    threshold = max(settings.id_loss_max_t, settings.lpips_max_t)

    ready: dict[int, dict] = {}

    def build(start: int) -> dict:
        return paper_batch(batch_size, resolution, id_dim, start, dropout=settings.id_loss_max_t < 1)

    def step(start: int) -> dict:
        batch = ready.pop(start) if start in ready else build(start)
        logs = training_step(parts, batch, settings, optimizer)
        logs["gated"] = float(_gate_share(settings, batch["index"], threshold))
        if fm_losses is not None:
            fm_losses.append(logs["loss/fm"])
        return logs
    step.prepare = lambda starts: ready.update({start: build(start) for start in starts})
    return step


def _gate_share(settings: Any, indices: Any, threshold: float) -> float:
    """Share of the batch whose t (drawn as compute_loss draws it) opens the ID / LPIPS gate."""
    from appleswap.train import losses
    from appleswap.train.teacher import sample_generator

    ts = [float(losses.sample_timesteps(1, mean=settings.logit_mean, std=settings.logit_std,
                                        generator=sample_generator(settings.seed, 0, int(i)))[0]) for i in indices]
    return sum(t <= threshold for t in ts) / len(ts)


def transformer_flops(model: Any, batch: dict, parts: Any) -> float:
    """Model FLOPs of one sample: forward + input-gradient backward (2 x forward), no recomputation counted."""
    import torch

    from appleswap.benchmark.utils import count_flops
    from appleswap.model.latents import image_ids, vae_scale_factor
    from appleswap.train.teacher import batch_text, encode_posterior, sample_generator

    with torch.no_grad():
        device, dtype = model.device, model.dtype
        latents = encode_posterior(parts.vae, batch["target"][:1], [sample_generator(0, 0, 0)]).to(device, dtype)
        size = batch["target"].shape[-1]
        text = batch_text(parts, batch["drop_text"][:1], device, dtype)
        ids = image_ids(size, size, device=device, vae_scale=vae_scale_factor(parts.vae))
        t = torch.full((1,), 0.5, device=device, dtype=dtype)
        forward = count_flops(lambda: model(latents, t, text=text, img_ids=ids, condition=latents,
                                            id_tokens=batch["id_tokens"][:1].to(device, dtype), guidance=t))
    return 2 * forward


def plain_rows(args: argparse.Namespace, device: Any, batch_size: int, ceiling: float) -> list[BatchRow]:
    """The baseline: diffusers FLUX + peft LoRA of the same targets / rank, same tokens, FM loss, AdamW."""
    import torch
    from peft import LoraConfig

    from appleswap.benchmark.models import BenchConfig, build_models
    from appleswap.benchmark.utils import count_flops
    from appleswap.model.lora import apple_target_modules

    dtype = torch.float32 if args.tiny else torch.bfloat16
    flux, vae = build_models(BenchConfig(tiny=args.tiny), device, dtype)
    del vae
    targets = apple_target_modules(len(flux.transformer_blocks), len(flux.single_transformer_blocks))
    flux.add_adapter(LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, init_lora_weights="gaussian",
                                target_modules=targets))
    flux.requires_grad_(False)
    params = [p for n, p in flux.named_parameters() if "lora_" in n]
    for param in params:
        param.data = param.data.float()
        param.requires_grad_(True)
    flux.enable_gradient_checkpointing()
    flux.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4, weight_decay=1e-3)
    config, text_len = flux.config, 8 if args.tiny else args.text_tokens
    image_len = 2 * (32 * 32 if args.tiny else 64 * 64 // 4)  # image + condition tokens (2 x 1,024 at 512 px)
    generator = torch.Generator().manual_seed(0)

    def inputs(batch: int) -> dict:
        def rand(*shape):
            return torch.randn(*shape, generator=generator).to(device, dtype)
        return {"hidden_states": rand(batch, image_len, config.in_channels),
                "encoder_hidden_states": rand(batch, text_len, config.joint_attention_dim),
                "pooled_projections": rand(batch, config.pooled_projection_dim),
                "timestep": torch.rand(batch, generator=generator).to(device, dtype),
                "guidance": torch.ones(batch, device=device, dtype=dtype),
                "img_ids": torch.zeros(image_len, 3, device=device, dtype=dtype),
                "txt_ids": torch.zeros(text_len, 3, device=device, dtype=dtype)}

    ready: list[tuple[dict, torch.Tensor]] = []

    def build() -> tuple[dict, torch.Tensor]:
        batch = inputs(batch_size)
        return batch, torch.randn(batch["hidden_states"].shape, generator=generator).to(device)

    def step(_start: int) -> dict:
        batch, target = ready.pop() if ready else build()
        prediction = flux(**batch, return_dict=False)[0].float()
        loss = torch.nn.functional.mse_loss(prediction, target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return {}
    step.prepare = lambda starts: ready.extend(build() for _ in starts)

    with torch.no_grad():
        flops = 2 * count_flops(lambda: flux(**inputs(1), return_dict=False))
    return [time_steps(step, batch_size, args, device, "plain diffusers + peft (FM loss only)", flops, ceiling)]


def loss_reference(recipes: list[str]) -> str | None:
    """The bf16 row the fp8 rows' losses are compared with: ``compiled`` (the same recipe without fp8), else the
    last paper-recipe row before the first fp8 row; None without fp8 rows or such a row."""
    if not any(r in FP8_RECIPES for r in recipes):
        return None
    if "compiled" in recipes:
        return "compiled"
    first = min(recipes.index(r) for r in FP8_RECIPES if r in recipes)
    return next((r for r in reversed(recipes[:first]) if r in ("paper", "fused", "partial")), None)


def relative_loss_difference(losses: list[float], reference: list[float]) -> tuple[float, float]:
    """(mean, max) over the steps both ran of |loss - reference| / |reference|."""
    pairs = list(zip(losses, reference))
    if not pairs:
        return float("nan"), float("nan")
    differences = [abs(a - b) / abs(b) for a, b in pairs]
    return statistics.fmean(differences), max(differences)


def fp8_note(recipe_losses: list[float], reference: str | None, reference_losses: list[float] | None) -> str:
    if reference is None or not reference_losses:
        return "no bf16 reference row ran (add 'compiled' to --recipes) for the loss difference"
    mean, worst = relative_loss_difference(recipe_losses, reference_losses)
    first, _ = relative_loss_difference(recipe_losses[:1], reference_losses[:1])
    return (f"fm loss vs the '{reference}' row (same LoRA start, batches and seeds): first step (the forward "
            f"alone) rel. diff {first:.2e}; over {len(recipe_losses)} steps (LoRAs updated apart) mean "
            f"{mean:.2e}, max {worst:.2e}")


def quantize_for_fp8_rows(model: Any, device: Any) -> int:
    """The frozen block linears to fp8 in place, as ``fp8_base`` does (compiled graphs of the bf16 blocks dropped
    first, so the bf16 weights they hold are freed)."""
    import torch._dynamo

    from appleswap.speed import uncompile_block_functions
    from appleswap.speed.fp8_training import quantize_frozen_fp8

    uncompile_block_functions(model)
    torch._dynamo.reset()
    count = quantize_frozen_fp8(model)
    free_after_oom(None, device)
    logger.info("fp8 rows: %d frozen block linears quantised to e4m3", count)
    return count


def apple_rows(args: argparse.Namespace, device: Any, recipes: list[str], batch_size: int, ceiling: float,
               parts: Any) -> tuple[list[BatchRow], Callable[[int], BatchRow] | None]:
    """The APPLE recipes on one set of parts; returns the rows and a runner of the last recipe (for --sweep)."""
    import torch

    from appleswap.speed import compile_block_functions, uncompile_block_functions
    from appleswap.train.build import make_optimizer
    from appleswap.train.config import TrainConfig

    model = parts.transformer
    params = [p for p in model.parameters() if p.requires_grad]
    resolution, id_dim = (64, TINY_ID_DIM) if args.tiny else (512, FULL_ID_DIM)
    flops = transformer_flops(model, paper_batch(1, resolution, id_dim, 0), parts)
    labels = {"worst": "APPLE, ID + LPIPS on every sample (worst case)",
              "paper": "APPLE paper recipe (t <= 0.35 gates, 10 % dropouts)",
              "fused": "+ fused AdamW",
              "blocks": "+ regional torch.compile of the blocks",
              "compiled": "+ regional torch.compile of the blocks and the VAE encoder",
              "partial": f"+ checkpointing on {args.checkpoint_fraction:.0%} of the blocks",
              "fp8": "compiled + fp8 frozen base (e4m3 forward and input gradient), all blocks checkpointed",
              "fp8partial": f"+ checkpointing on {args.checkpoint_fraction:.0%} of the blocks (fp8 base)",
              "budget": f"compiled, selective checkpointing: blocks keep {args.memory_budget:.0%} of activations",
              "fp8budget": f"fp8 base, selective checkpointing: blocks keep {args.memory_budget:.0%} of activations",
              "fp8recompute": "+ the ID / LPIPS decode recomputed per gated sample in backward (fp8 base)",
              "fp8lean": (f"fp8 base without the transposed copy, blocks keep {args.lean_memory_budget:.0%} of "
                          "activations")}
    reference = loss_reference(recipes)
    fm_losses: dict[str, list[float]] = {}
    start_lora: list[torch.Tensor] | None = None  # the LoRA as the reference row found it (host copy)
    rows, runner, quantized, compiled_budget = [], None, False, "none"
    profiles: list[tuple[str, str]] = []
    for recipe in recipes:
        fp8 = recipe in FP8_RECIPES
        if fp8 and not quantized:
            quantize_for_fp8_rows(model, device)
            quantized = True
        if recipe == reference:
            start_lora = [p.detach().to("cpu", copy=True) for p in params]
        elif fp8 and start_lora is not None:
            with torch.no_grad():
                for param, value in zip(params, start_lora):
                    param.copy_(value)
        fused = recipe in ("fused", *COMPILED_RECIPES)
        settings = loss_settings(recipe, args.all_gated)
        optimizer = make_optimizer(params, TrainConfig(learning_rate=1e-4, weight_decay=1e-3, fused_adamw=fused))
        budget = None if recipe not in BUDGET_RECIPES else \
            args.lean_memory_budget if recipe == "fp8lean" else args.memory_budget
        if recipe == "fp8lean":
            drop_transposed_copies(model, device)
        if recipe in COMPILED_RECIPES:
            if budget != compiled_budget and compiled_budget != "none":
                torch._dynamo.reset()  # the partitioner reads the budget when a graph compiles: compile again
            compile_block_functions(model, memory_budget=budget)
            compiled_budget = budget
        else:
            uncompile_block_functions(model)
        compile_encoder(parts.vae, recipe in COMPILED_RECIPES and recipe != "blocks")
        partial = recipe in ("partial", "fp8partial")
        model.enable_gradient_checkpointing(0.0 if budget is not None else
                                            args.checkpoint_fraction if partial else 1.0)

        def run_batch(size, settings=settings, optimizer=optimizer, label=labels[recipe], record=None):
            return time_steps(apple_step(parts, optimizer, settings, size, args, record), size, args, device,
                              label, flops, ceiling)
        try:
            rows.append(run_batch(batch_size, record=fm_losses.setdefault(recipe, [])))
            if fp8:
                rows[-1].note += "; " + fp8_note(fm_losses[recipe], reference, fm_losses.get(reference))
        except torch.OutOfMemoryError as error:
            logger.warning("%s: out of memory (%s)", recipe, str(error).splitlines()[0][:120])
            rows.append(BatchRow(batch_size, None, float("nan"), "out of memory", labels[recipe]))
        if args.profile and rows[-1].seconds is not None:
            steps = apple_step(parts, optimizer, settings, batch_size, args)
            profiles.append((labels[recipe], profile_steps(steps, device, rows[-1].seconds, top=not profiles)))
        free_after_oom(optimizer, device)
        logger.info("%s: %s", recipe, rows[-1])
        runner = run_batch
    for label, text in profiles:
        print(f"\n### GPU time of two steps: {label}\n{text}")
    return rows, runner


def loss_settings(recipe: str, all_gated: bool) -> Any:
    """The paper's loss settings, gates opened for every sample for ``worst`` (or all rows with ``--all-gated``)."""
    from appleswap.train.teacher import LossSettings

    gates = {"id_loss_max_t": 1.0, "lpips_max_t": 1.0} if all_gated or recipe == "worst" else {}
    return LossSettings(recompute_aux_losses=recipe == "fp8recompute", **gates)


def drop_transposed_copies(model: Any, device: Any) -> None:
    """``fp8_transposed_copy: false`` on an already quantised model: the backward's e4m3 copies freed in place."""
    from appleswap.speed.fp8_training import FrozenFp8Linear

    for module in model.modules():
        if isinstance(module, FrozenFp8Linear):
            module.drop_transposed_copy()
    free_after_oom(None, device)


def compile_encoder(vae: Any, compiled: bool) -> None:
    """The VAE encoder compiled (as training's ``compile`` does) or eager again (``Module.compile``'s wrapper
    dropped)."""
    from appleswap.speed.vae import compile_vae

    if not compiled:
        vae.encoder._compiled_call_impl = None
    elif vae.encoder._compiled_call_impl is None:
        compile_vae(vae, decoder=False)


KERNEL_KINDS = (  # (kind, substrings of the lower-cased kernel name), first match wins
    ("inductor fused", ("triton_",)),  # inductor names them by their ops ("_to_copy", "convert_element_type")
    ("attention", ("flash", "fmha", "attention", "sdpa")),
    ("fp8 GEMM", ("e4m3", "f8f8", "fp8")),
    ("convolution", ("conv2d", "cudnn", "winograd", "implicit", "fprop", "dgrad", "wgrad")),
    ("GEMM", ("gemm", "nvjet", "cutlass", "xmma", "matmul", "cublas", "splitk")),
    ("optimizer", ("adam", "multi_tensor", "foreach")),
    ("copy / cast", ("copy", "cast", "memcpy", "memset", "fill")),
)


def kernel_kind(name: str) -> str:
    lowered = name.lower()
    return next((kind for kind, keys in KERNEL_KINDS if any(key in lowered for key in keys)), "other")


def profile_steps(step: Callable[[int], dict], device: Any, seconds: float, top: bool, steps: int = 2) -> str:
    """GPU kernel time of ``steps`` steps by kind (and, with ``top``, the 15 longest kernels): where a step goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile

    if torch.device(device).type != "cuda":
        return "(no GPU: nothing to profile)"
    sync(device)
    start = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for n in range(steps):
            step(20_000 + n * 97)
        sync(device)
    wall = (time.perf_counter() - start) / steps * 1e3
    by_kind: dict[str, float] = {}
    by_name: dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        elapsed = event.time_range.elapsed_us() / 1e3 / steps
        by_kind[kernel_kind(event.name)] = by_kind.get(kernel_kind(event.name), 0.0) + elapsed
        by_name[event.name] = by_name.get(event.name, 0.0) + elapsed
    busy = sum(by_kind.values())
    header = (f"profiled {wall:.0f} ms / step (timed row {seconds * 1e3:.0f} ms); kernels {busy:.0f} ms, idle "
              f"{max(wall - busy, 0):.0f} ms")
    lines = [header, "| kind | ms / step | share |", "|---|---|---|"]
    lines += [f"| {kind} | {ms:.1f} | {ms / wall:.1%} |" for kind, ms in sorted(by_kind.items(), key=lambda kv: -kv[1])]
    if top:
        lines += ["", "| kernel (top 15) | ms / step |", "|---|---|"]
        lines += [f"| {name[:100]} | {ms:.1f} |" for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:15]]
    return "\n".join(lines)


def loader_rate(workers: int, batch_size: int, images: int, resolution: int, tiny: bool) -> float:
    """Samples/s of the real teacher DataLoader (JPEG target + source, PNG condition, ID tokens, dropouts) over a
    preprocessed layout written from the test photos."""
    import tempfile

    import torch

    with tempfile.TemporaryDirectory() as folder:
        root, cache = write_loader_dataset(Path(folder), images, resolution, TINY_ID_DIM if tiny else FULL_ID_DIM)
        from appleswap.train.config import CONDITION_FOLDER
        from appleswap.train.data import IdTokenStore, TeacherDataset, index_targets

        data = TeacherDataset(root, index_targets(root, CONDITION_FOLDER, 5.1), IdTokenStore(cache),
                              condition_folder=CONDITION_FOLDER, resolution=resolution)
        loader = torch.utils.data.DataLoader(data, batch_size=batch_size, num_workers=workers, shuffle=True,
                                             pin_memory=torch.cuda.is_available(), drop_last=True)
        for _ in loader:  # warm-up epoch: worker start, page cache
            pass
        start, count = time.perf_counter(), 0
        for _ in range(2):
            for batch in loader:
                count += len(batch["index"])
        return count / (time.perf_counter() - start)


def write_loader_dataset(folder: Path, images: int, resolution: int, id_dim: int) -> tuple[Path, Path]:
    """``images`` 512 px JPEGs + condition PNGs in 8 identity folders (cut from the repo's test photos), score.json
    and a prepare-ids cache: the files and formats the teacher dataset reads."""
    import json

    import numpy as np
    import torch
    from PIL import Image

    from appleswap.identity.store import save_identity
    from appleswap.train.config import CONDITION_FOLDER

    photos = sorted((Path(__file__).resolve().parents[1] / "tests" / "data" / "faces").glob("*.jpg"))
    rng = np.random.default_rng(0)
    root, cache, scores = folder / "data", folder / "ids", {}
    for n in range(images):
        identity, name = f"id{n % 8}", f"img{n:04d}"
        photo = Image.open(photos[n % len(photos)]).convert("RGB")
        side = min(photo.size)
        left, top = rng.integers(0, photo.width - side + 1), rng.integers(0, photo.height - side + 1)
        crop = photo.crop((left, top, left + side, top + side)).resize((resolution, resolution))
        (root / identity / CONDITION_FOLDER).mkdir(parents=True, exist_ok=True)
        crop.save(root / identity / f"{name}.jpg", quality=95)
        crop.save(root / identity / CONDITION_FOLDER / f"{name}.png")
        save_identity(cache / "masked" / identity / f"{name}.safetensors", torch.randn(1, 32, id_dim))
        scores[f"{identity}/{name}"] = {"aes": 6.0}
    save_identity(cache / "null.safetensors", torch.zeros(1, 32, id_dim))
    (root / "score.json").write_text(json.dumps(scores))
    return root, cache


def free_after_oom(optimizer: Any, device: Any) -> None:
    """Drop gradients and cached blocks left by a failed step (called outside the ``except`` block)."""
    import torch

    if optimizer is not None:
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
    lines = ["| step | batch | s / step | samples / s | x plain | of bf16 ceiling | peak memory (GiB) | note |",
             "|---|---|---|---|---|---|---|---|"]
    plain = next((r for r in rows if r.recipe.startswith("plain") and r.seconds), None)
    for row in rows:
        if row.seconds is None:
            status = "OOM" if row.note == "out of memory" else "-"
            lines.append(f"| {row.recipe} | {row.batch} | {status} | - | - | - | - | {row.note} |")
            continue
        loader = row.recipe.startswith("data loader")
        speedup = f"{row.samples_per_s / plain.samples_per_s:.2f}" if plain and not loader else "-"
        fraction = f"{row.fraction:.3f}" if row.fraction == row.fraction else "-"
        peak = f"{row.peak_gib:.2f}" if row.peak_gib == row.peak_gib else "-"
        lines.append(f"| {row.recipe} | {row.batch} | {row.seconds:.3f} | {row.samples_per_s:.3f} | {speedup} | "
                     f"{fraction} | {peak} | {row.note} |")
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
    """The recipes in order at ``--batch``, then (``--sweep``) the last recipe over batch sizes."""
    import torch

    from appleswap.benchmark.utils import matmul_ceiling

    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        torch.backends.cuda.enable_cudnn_sdp(False)  # cuDNN SDPA backward crashed at these shapes (gpu_notes)
        torch.backends.cuda.matmul.allow_tf32 = True
    card = card_summary(device, args.memory_cap_gib)
    recipes = [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = sorted(set(recipes) - set(RECIPES))
    if unknown:
        raise ValueError(f"--recipes: unknown {unknown}; choose from {', '.join(RECIPES)}")
    ceiling = matmul_ceiling(device, torch.bfloat16, 8192) if device.type == "cuda" else 0.0
    start = time.perf_counter()
    deadline = start + args.time_budget_s if args.time_budget_s else None
    rows: list[BatchRow] = []
    if "plain" in recipes:
        rows += plain_rows(args, device, args.batch, ceiling)
        free_after_oom(None, device)  # the plain model went with plain_rows' frame
    apple = [r for r in recipes if r != "plain"]
    trainable = 0.0
    if apple:
        parts = build_parts(args, device)
        trainable = sum(p.numel() for p in parts.transformer.parameters() if p.requires_grad) / 1e6
        found, runner = apple_rows(args, device, apple, args.batch, ceiling, parts)
        rows += found
        if args.sweep and runner is not None:
            sizes = [b for b in batch_sizes(args.batches, args.max_batch) if b > args.batch]
            rows += sweep(runner, sizes, lambda: free_after_oom(None, device), deadline)
    if args.loader:
        rate = loader_rate(args.loader_workers, args.batch, 64, 64 if args.tiny else 512, args.tiny)
        rows.append(BatchRow(args.batch, args.batch / rate, float("nan"),
                             f"{args.loader_workers} CPU workers, JPEG/PNG decode + ID tokens",
                             "data loader alone"))
    id_name = f"arcface {'1,1,1,1' if args.tiny else args.arcface_layers}" if args.id_net == "arcface" else "irse50"
    header = (f"APPLE teacher training step ({'tiny' if args.tiny else 'full FLUX.1'} config, random weights): "
              f"{card}; {environment()}; LoRA r{args.lora_rank} ({trainable:.1f} M trainable, fp32); ID loss "
              f"({id_name}) + LPIPS-VGG; mean of {args.repeats} steps after {args.warmup} warm-up; "
              f"bf16 matmul ceiling {ceiling / 1e12:.0f} TFLOP/s")
    return rows, header


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(message)s")
    rows, header = run(args)
    print(header)
    print(format_table(rows))
    if args.sweep:
        stopped = "stopped at the first OOM" if ran_out_of_memory(rows) else "no OOM in the sweep"
        print(f"largest batch that fit: {largest_fit(rows)} ({stopped})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
