"""Build the training parts and datasets from a config: weights through the registry, never downloaded."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from appleswap.config import torch_dtype
from appleswap.speed import compile_block_functions
from appleswap.speed.vae import compile_vae
from appleswap.train.config import StudentConfig, TrainConfig
from appleswap.train.data import Dropout, IdTokenStore, TeacherDataset, index_targets, split_validation
from appleswap.train.teacher import TrainParts
from appleswap.weights import locate

log = logging.getLogger(__name__)


def _require(value: Any, name: str) -> Any:
    if value is None:
        raise ValueError(f"`{name}` is required (set it in the config file or with --{name.replace('_', '-')})")
    return value


def preflight(config: TrainConfig, weights_dir: str | None) -> None:
    """Check every input and weight a run needs before any model is loaded (loading FLUX takes a while); one
    error lists each missing one with the command or source that makes it."""
    from appleswap.train.data import missing_scores_message
    from appleswap.weights import MissingWeightError

    problems: list[str] = []
    root = Path(config.dataset_root) if config.dataset_root else None
    if root is None:
        problems.append("`dataset_root` is not set (config file key or --dataset-root)")
    elif not root.is_dir():
        problems.append(f"dataset_root {root} is not a folder: write it with `appleswap preprocess PHOTOS {root}`")
    elif config.aes_threshold is not None and not (root / "score.json").is_file():
        problems.append(missing_scores_message(root))
    if not config.id_cache:
        problems.append("`id_cache` is not set (config file key or --id-cache)")
    else:
        cache = Path(config.id_cache)
        for needed in (cache / config.id_from, cache / "null.safetensors"):
            if not needed.exists():
                problems.append(f"{needed} not found: write the ID cache with `appleswap prepare-ids "
                                f"{root or 'DATASET'} -o {cache}`")
                break
    if isinstance(config, StudentConfig):
        pseudo = Path(config.pseudo_root) if config.pseudo_root else None
        if pseudo is None or not (pseudo / "pairs.json").is_file():
            problems.append(f"pseudo_root {pseudo or '(not set)'}: no pairs.json; make the pseudo-triplets with "
                            "`appleswap pseudo --config configs/pseudo.yaml`")
    if config.init_lora and not Path(config.init_lora).exists():
        problems.append(f"init_lora {config.init_lora} not found")
    weights = [("flux", config.flux), ("pulid_flux", config.pulid)]
    if config.id_loss != "none" and config.id_loss_weight > 0:
        weights.append(("arcface_simswap" if config.id_loss == "arcface" else "arcface_irse50", config.arcface))
    if config.lpips_weight > 0:
        weights.append(("vgg16_lpips", config.vgg16))
    for name, explicit in weights:
        try:
            locate(name, weights_dir, explicit=explicit)
        except MissingWeightError as error:
            problems.append(str(error))
    if problems:
        raise FileNotFoundError(f"{len(problems)} input(s) missing, nothing was loaded:\n- " + "\n- ".join(problems))


def build_loss_networks(config: TrainConfig, weights_dir: str | None, device: torch.device) -> tuple:
    """(IdentityLoss or None, LPIPS or None) from local weights."""
    from appleswap.train.losses import build_identity_loss, build_lpips

    id_loss = lpips = None
    if config.id_loss != "none" and config.id_loss_weight > 0:
        name = "arcface_simswap" if config.id_loss == "arcface" else "arcface_irse50"
        try:
            path = locate(name, weights_dir, explicit=config.arcface)
        except KeyError as error:
            raise ValueError(f"id_loss={config.id_loss}: no registry entry {name!r}; pass --arcface PATH") from error
        id_loss = build_identity_loss(config.id_loss, path, device)
    if config.lpips_weight > 0:
        lpips = build_lpips(locate("vgg16_lpips", weights_dir, explicit=config.vgg16), device)
    return id_loss, lpips


def prepare_lora(transformer: torch.nn.Module, config: TrainConfig) -> None:
    """Fresh rank-r Gaussian LoRA (or the init LoRA), kept in float32 as the only trainable tensors."""
    if config.init_lora:
        path = Path(config.init_lora)
        transformer.load_lora(path / "default.safetensors" if path.is_dir() else path)
    else:
        transformer.add_lora(rank=config.lora_rank, alpha=config.lora_alpha)
    transformer.requires_grad_(False)
    for param in transformer.lora_parameters():
        param.data = param.data.float()
        param.requires_grad_(True)
    if config.gradient_checkpointing:
        transformer.enable_gradient_checkpointing(config.checkpoint_fraction)
    count = sum(p.numel() for p in transformer.lora_parameters())
    log.info("trainable LoRA parameters: %.1f M", count / 1e6)


def make_optimizer(params: list[torch.nn.Parameter], config: TrainConfig) -> torch.optim.AdamW:
    """AdamW over the LoRA parameters: the fused single-kernel update where torch has one for their device (CUDA),
    else the multi-tensor one; both compute the same update."""
    devices = {p.device.type for p in params}
    fused = bool(config.fused_adamw) and devices == {"cuda"}
    return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=config.weight_decay,
                             fused=fused or None)


def apply_training_speed(transformer: torch.nn.Module, config: TrainConfig, device: torch.device) -> None:
    """The speed options of a training run that act on the model, after the LoRA is added and frozen:
    ``fp8_base`` (the frozen block linears in e4m3 for forward and input gradient; on the CPU the same layers
    multiply by their dequantised weights), then ``compile`` (regional torch.compile of the block functions, on a
    GPU only; the CPU keeps eager blocks, which tests compare against), with ``activation_memory_budget``."""
    if config.fp8_base:
        from appleswap.speed.fp8_training import quantize_frozen_fp8

        count = quantize_frozen_fp8(transformer, transposed_copy=config.fp8_transposed_copy)
        log.info("training: %d frozen block linears in fp8 (e4m3, row-wise scales; LoRA in fp32)", count)
    budget = config.activation_memory_budget
    if budget is not None and not (config.compile and torch.device(device).type == "cuda"):
        log.warning("activation_memory_budget %s has no effect: it acts on compiled blocks (compile: true, a GPU)",
                    budget)
    elif budget is not None and config.gradient_checkpointing and config.checkpoint_fraction >= 1.0:
        log.warning("activation_memory_budget %s has no effect while every block is recomputed whole: set "
                    "checkpoint_fraction below 1 (0 hands every block to the budget)", budget)
    if config.compile and torch.device(device).type == "cuda":
        compile_block_functions(transformer, memory_budget=config.activation_memory_budget)
        log.info("training: transformer blocks compiled (regional torch.compile%s)",
                 "" if config.activation_memory_budget is None
                 else f", activation memory budget {config.activation_memory_budget}")


def build_parts(config: TrainConfig, weights_dir: str | None, device: torch.device) -> TrainParts:
    """Transformer (FLUX + PuLID CA + LoRA), VAE, prompt embeddings and loss networks on ``device``."""
    from appleswap.model.loading import load_apple_transformer, load_vae
    from appleswap.model.text import load_text_embeddings

    dtype = torch_dtype(config.mixed_precision)
    flux = locate("flux", weights_dir, explicit=config.flux)
    pulid = locate("pulid_flux", weights_dir, explicit=config.pulid)
    transformer = load_apple_transformer(flux, pulid_path=pulid, dtype=dtype, device=device)
    prepare_lora(transformer, config)
    apply_training_speed(transformer, config, device)
    vae = load_vae(flux, dtype=dtype, device=device).requires_grad_(False)
    if config.compile and torch.device(device).type == "cuda":
        compile_vae(vae, decoder=False)  # target + condition are encoded every step, in one batch of fixed size
    text = load_text_embeddings(flux, config.prompt, device=device, dtype=dtype)
    empty = load_text_embeddings(flux, "", device=device, dtype=dtype)
    id_loss, lpips = build_loss_networks(config, weights_dir, device)
    return TrainParts(transformer, vae, text, empty, id_loss, lpips)


def build_teacher_data(config: TrainConfig) -> tuple[TeacherDataset, TeacherDataset | None]:
    """Teacher train/validation datasets from the preprocessed layout and the prepare-ids cache."""
    root = _require(config.dataset_root, "dataset_root")
    ids = IdTokenStore(_require(config.id_cache, "id_cache"), config.id_from)
    targets = index_targets(root, config.condition_folder, config.aes_threshold)
    train_items, val_items = split_validation(targets, config.num_validation, config.seed) \
        if config.num_validation else (targets, [])
    dropout = Dropout(config.drop_text, config.drop_condition, config.drop_id)
    common = {"condition_folder": config.condition_folder, "resolution": config.resolution, "seed": config.seed}
    train_set = TeacherDataset(root, train_items, ids, dropout=dropout, **common)
    val_set = TeacherDataset(root, val_items, ids, validation=True, **common) if val_items else None
    log.info("teacher data: %d training targets, %d held out", len(train_items), len(val_items))
    return train_set, val_set


def build_student_data(config: StudentConfig) -> tuple[Any, Any]:
    """Student train/validation datasets from a pseudo folder (the last ``num_validation`` triplets held out)."""
    from appleswap.train.student_data import StudentDataset, index_triplets

    root = _require(config.dataset_root, "dataset_root")
    pseudo_root = _require(config.pseudo_root, "pseudo_root")
    ids = IdTokenStore(_require(config.id_cache, "id_cache"), config.id_from)
    thresholds = {name: getattr(config, name) for name in
                  ("min_aes", "min_id_similarity", "max_pose_error", "max_expression_error")}
    pairs = index_triplets(pseudo_root, thresholds, config.train_size, config.seed)
    cut = len(pairs) - config.num_validation if config.num_validation < len(pairs) else len(pairs)
    dropout = Dropout(config.drop_text, config.drop_condition, config.drop_id)
    common = {"resolution": config.resolution, "seed": config.seed}
    train_set = StudentDataset(root, pseudo_root, pairs[:cut], ids, dropout=dropout,
                               proxy_recon_prob=config.proxy_recon_prob, **common)
    val_set = StudentDataset(root, pseudo_root, pairs[cut:], ids, validation=True, **common) \
        if cut < len(pairs) else None
    return train_set, val_set
