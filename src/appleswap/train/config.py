"""Training configs as data: one dataclass per stage, the paper's recipe as defaults (docs/method.md).

The YAML files in ``configs/`` mirror these fields; ``--flag`` values override them (``config.resolve_config``).
"""

from __future__ import annotations

import dataclasses
from typing import Literal

from appleswap.config import SPEED_HELP, Dtype, SpeedProfile, option

CONDITION_FOLDER = "condition_blended_image_blurdownsample8_segGlass_landmark_iris"
PROMPT = "a photo of human face"


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Teacher training (conditional deblurring, docs/method.md: Teacher step); the student reuses every field."""

    dataset_root: str | None = option(None, "preprocessed dataset root: <root>/<id>/<name>.jpg, condition folder, "
                                            "score.json")
    id_cache: str | None = option(None, "`appleswap prepare-ids` cache (masked/, raw/, null.safetensors)")
    output_dir: str = option("runs/teacher", "run folder: checkpoints, TensorBoard logs, previews", flag="output",
                             short="-o")
    condition_folder: str = option(CONDITION_FOLDER, "per-identity folder holding the condition PNGs")
    aes_threshold: float | None = option(5.1, "keep targets whose aesthetic score (score.json, written by "
                                         "`appleswap preprocess --aesthetic`) is above this; null: keep all")
    num_validation: int = option(5, "held-out targets (validated with a source of another identity)")
    id_from: Literal["masked", "raw"] = option("masked", "ID tokens computed on the face-masked or raw photo")
    prompt: str = option(PROMPT, "fixed text prompt")
    drop_text: float = option(0.1, "probability of replacing the prompt by ''")
    drop_condition: float = option(0.1, "probability of replacing the condition by a black image")
    drop_id: float = option(0.1, "probability of replacing the ID tokens by the null-ID tokens")
    resolution: int = option(512, "training resolution (square)", flag="size")
    lora_rank: int = option(64, "LoRA rank on the condition branch")
    lora_alpha: float = option(64.0, "LoRA alpha (scale = alpha / rank)")
    init_lora: str | None = option(None, "start from this LoRA (default.safetensors or its folder)")
    learning_rate: float = option(1e-4, "AdamW learning rate")
    weight_decay: float = option(1e-3, "AdamW weight decay")
    max_grad_norm: float = option(0.5, "gradient clipping norm")
    batch_size: int = option(4, "images per process per micro-step")
    gradient_accumulation: int = option(4, "micro-steps per optimizer step")
    max_steps: int = option(50_000, "optimizer steps")
    mixed_precision: Dtype = option("bf16", "weights/compute dtype (bf16 = paper)", flag="dtype")
    gradient_checkpointing: bool = option(True, "recompute blocks in backward to save memory")
    logit_mean: float = option(0.0, "t = sigmoid(N(mean, std))")
    logit_std: float = option(1.0, "t = sigmoid(N(mean, std))")
    id_loss: Literal["arcface", "irse50", "none"] = option("arcface", "ID-loss network")
    id_loss_weight: float = option(1.0, "weight of (1 - cos) ID loss")
    id_loss_max_t: float = option(0.35, "apply the ID loss only for t <= this")
    lpips_weight: float = option(1.0, "weight of LPIPS-VGG (0 turns it off)")
    lpips_max_t: float = option(0.35, "apply LPIPS only for t <= this")
    arcface: str | None = option(None, "ArcFace ID-loss weights (.safetensors); default: registry entry")
    vgg16: str | None = option(None, "torchvision vgg16 weights for LPIPS; default: registry entry")
    flux: str | None = option(None, "FLUX diffusers folder; default: registry entry `flux`")
    pulid: str | None = option(None, "PuLID-FLUX weights; default: registry entry `pulid_flux`")
    save_every: int = option(250, "checkpoint every N optimizer steps")
    validate_every: int = option(250, "preview swaps every N optimizer steps (0 = never)")
    validation_steps: int = option(28, "sampling steps of the previews")
    validation_guidance: float = option(1.0, "FLUX guidance of the previews (1.0 = as trained)")
    log_every: int = option(10, "log scalars every N optimizer steps")
    keep_checkpoints: int = option(3, "accelerate states kept (LoRA files are always kept)")
    seed: int = option(0, "seed of data order, dropout, t and noise")
    num_workers: int = option(2, "DataLoader workers", flag="workers")
    # speed options: each keeps the function (tests/train/test_training_speed.py compares them with the plain step)
    compile: bool = option(False, "torch.compile the transformer blocks for training (GPU: a one-time compile, then "
                                  "faster steps; same gradients)")
    fused_adamw: bool = option(True, "AdamW as one fused kernel where torch has it (CUDA); same update")
    checkpoint_fraction: float = option(1.0, "share of the transformer blocks recomputed in backward when "
                                             "gradient_checkpointing is on (1 = all; less is faster and needs more "
                                             "memory; same gradients)")
    activation_memory_budget: float | None = option(
        None, "with compile on a GPU: the blocks not recomputed whole (see checkpoint_fraction) keep this share "
              "(0-1) of their activations and recompute the cheapest rest, chosen by the compiler (selective "
              "checkpointing: faster than whole-block recomputation for the memory; same gradients)")
    fp8_base: bool = option(False, "frozen block weights in fp8 (e4m3, row-wise scales) for the forward and the "
                                   "input gradient (faster on Hopper; changes numerics slightly, the LoRA stays "
                                   "fp32; docs/training.md)")
    fp8_transposed_copy: bool = option(True, "with fp8_base: a second e4m3 copy of each frozen weight, transposed, "
                                             "for the input gradient (+11 GiB at FLUX size); off: the backward "
                                             "transposes the forward copy layer by layer")
    recompute_aux_losses: bool = option(False, "decode + ID loss + LPIPS of each gated sample (t <= *_max_t) in "
                                               "its own checkpoint region, recomputed in backward: the peak memory "
                                               "no longer grows with the gated samples, for one more decode each "
                                               "(same gradients)")


@dataclasses.dataclass(frozen=True)
class StudentConfig(TrainConfig):
    """Student training (docs/method.md): condition = pseudo image, ID = another photo of the target, GT = the real
    target."""

    output_dir: str = option("runs/student", "run folder: checkpoints, TensorBoard logs, previews", flag="output",
                             short="-o")
    pseudo_root: str | None = option(None, "`appleswap pseudo` output folder (PNGs, pairs.json, scores.json)")
    proxy_recon_prob: float = option(0.0, "probability of using the real target as condition (proxy "
                                          "reconstruction; the reference used 0.5)")
    min_aes: float | None = option(None, "drop triplets whose aesthetic score is below this")
    min_id_similarity: float | None = option(None, "drop triplets whose ArcFace similarity to the source is below")
    max_pose_error: float | None = option(None, "drop triplets whose landmark pose error to the target is above")
    max_expression_error: float | None = option(None, "drop triplets whose expression error is above this")
    train_size: int | None = option(None, "use at most this many triplets (a seeded random subset)")


@dataclasses.dataclass(frozen=True)
class PseudoConfig:
    """Pseudo-triplet generation with the teacher and attribute-aware inversion (docs/method.md: Pseudo-triplets)."""

    dataset_root: str | None = option(None, "preprocessed dataset root (as for the teacher)")
    id_cache: str | None = option(None, "`appleswap prepare-ids` cache; sources use raw (unmasked) tokens")
    output_dir: str = option("pseudo", "output folder: {src}_{n}_{trg}_{n}.png, pairs.json, scores.json",
                             flag="output", short="-o")
    teacher: str | None = option(None, "teacher LoRA (default.safetensors); default: registry `apple_teacher`",
                                 flag="lora")
    condition_folder: str = option(CONDITION_FOLDER, "per-identity folder holding the condition PNGs")
    aes_threshold: float | None = option(5.1, "pool: images whose aesthetic score is above this (score.json); "
                                         "null: all")
    num_pairs: int = option(100_000, "distinct-identity pairs to draw")
    seed: int = option(42, "pair-drawing seed")
    num_steps: int = option(28, "inversion steps = generation steps", flag="steps")
    guidance: float = option(1.0, "FLUX guidance", flag="guidance-scale")
    size: int = option(512, "image size (square)", aliases=("resolution",))
    prompt: str = option(PROMPT, "fixed text prompt")
    score: bool = option(True, "write per-triplet scores (aesthetic, ID similarity, pose, expression)")
    flux: str | None = option(None, "FLUX diffusers folder; default: registry entry `flux`")
    pulid: str | None = option(None, "PuLID-FLUX weights; default: registry entry `pulid_flux`")
    arcface: str | None = option(None, "ArcFace weights for the ID-similarity score")
    mixed_precision: Dtype = option("bf16", "model dtype", flag="dtype")
    fp8: bool = option(False, "fp8 (e4m3, row-wise scaled, fast accumulation) transformer block weights: faster "
                       "on Hopper, half the memory; changes numerics slightly")
    parity: bool = option(False, "the authors' pseudo-generation settings (docs/fidelity.md)")
    compile: bool = option(True, "torch.compile the transformer blocks and the VAE on a GPU (once per process, then "
                           "faster passes; same function)")
    cuda_graphs: bool = option(True, "replay each transformer pass as one CUDA graph (GPU only)")
    speed: SpeedProfile | None = option(None, SPEED_HELP)
    batch_size: int | None = option(None, "pairs per teacher call (one batched inversion and generation); default 4 "
                                          "on a GPU, 1 on the CPU. Each pair's triplet is the same at any batch size")
