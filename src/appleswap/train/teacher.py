"""One training step of the teacher (and the student, which only feeds other data): docs/method.md: Teacher step

``compute_loss`` is the forward + losses; ``training_step`` adds backward, clipping and the AdamW step, so a
benchmark can time exactly one optimizer step. Every random draw of a sample (t, noise, VAE posterior noise)
comes from a generator keyed by (seed, epoch, dataset index): one process or several, and a resumed run, see
the same numbers for the same sample.
"""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from appleswap.model.latents import image_ids, pack_latents, placement, unpack_latents, vae_scale_factor
from appleswap.model.transformer import TextEmbeddings
from appleswap.train import losses


@dataclasses.dataclass
class TrainParts:
    """Everything a step needs: the LoRA-carrying transformer (trainable), frozen VAE, the prompt's and the
    empty prompt's embeddings, and the optional frozen loss networks."""

    transformer: nn.Module
    vae: nn.Module
    text: TextEmbeddings
    empty_text: TextEmbeddings
    id_loss: losses.IdentityLoss | None = None
    lpips: nn.Module | None = None


@dataclasses.dataclass(frozen=True)
class LossSettings:
    """The loss knobs of :class:`~appleswap.train.config.TrainConfig` (a config object can be passed too)."""

    logit_mean: float = 0.0
    logit_std: float = 1.0
    id_loss_weight: float = 1.0
    id_loss_max_t: float = 0.35
    lpips_weight: float = 1.0
    lpips_max_t: float = 0.35
    max_grad_norm: float = 0.5
    seed: int = 0
    recompute_aux_losses: bool = False


def sample_generator(seed: int, epoch: int, index: int, tag: str = "noise") -> torch.Generator:
    """A CPU generator for one sample and one use (``tag``), keyed by (seed, epoch, index)."""
    digest = hashlib.sha256(f"{seed}:{epoch}:{index}:{tag}".encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def encode_posterior(vae: nn.Module, images: torch.Tensor, generators: list[torch.Generator]) -> torch.Tensor:
    """Images in [0, 1] -> packed latent tokens, each sample drawn from its VAE posterior with its own generator."""
    with torch.no_grad():
        device, dtype = placement(vae)
        pixels = (images.to(device=device, dtype=dtype) * 2 - 1).clamp(-1, 1)
        dist = vae.encode(pixels).latent_dist
        eps = torch.stack([torch.randn(dist.mean.shape[1:], generator=g) for g in generators])
        latents = dist.mean + dist.std * eps.to(dist.mean)
        latents = (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor
    return pack_latents(latents.float())


def decode_differentiable(vae: nn.Module, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed tokens -> images in [-1, 1], with gradients through the frozen decoder (for the aux losses)."""
    scale = vae_scale_factor(vae)
    latents = unpack_latents(tokens, height // scale, width // scale).to(placement(vae)[1])
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return vae.decode(latents).sample.float()


def batch_text(parts: TrainParts, drop_text: torch.Tensor, device: torch.device, dtype: torch.dtype) -> TextEmbeddings:
    """Per-sample prompt: the fixed prompt, or the empty prompt where ``drop_text``."""
    full, empty = parts.text, parts.empty_text
    if full.prompt_embeds.shape != empty.prompt_embeds.shape:
        raise ValueError("prompt and empty-prompt embeddings must have the same shape (pad T5 to one length)")
    pick = drop_text.to(device).view(-1, 1, 1)
    embeds = torch.where(pick, empty.prompt_embeds.to(device), full.prompt_embeds.to(device))
    pooled = torch.where(pick[:, :, 0], empty.pooled.to(device), full.pooled.to(device))
    return TextEmbeddings(embeds.to(dtype), pooled.to(dtype), full.text_ids.to(device))


def _draws(batch: dict[str, Any], settings: Any, epoch: int, shape: tuple[int, ...]) -> tuple:
    indices = [int(i) for i in batch["index"]]
    gens = [sample_generator(settings.seed, epoch, i) for i in indices]
    t = torch.stack([losses.sample_timesteps(1, mean=settings.logit_mean, std=settings.logit_std, generator=g)[0]
                     for g in gens])
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
    return gens, t, noise


def compute_loss(parts: TrainParts, batch: dict[str, Any], settings: Any, *, epoch: int = 0,
                 model: nn.Module | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Flow-matching loss + gated ID and LPIPS losses on the decoded one-step x0 estimate.

    Args:
        batch: ``target``, ``condition``, ``source`` (B, 3, H, W) in [0, 1], ``id_tokens`` (B, 32, D),
            ``drop_text`` (B,) bool, ``index`` (B,) dataset indices.
        settings: a TrainConfig or LossSettings.
        model: the (possibly DDP-wrapped) transformer to call; defaults to ``parts.transformer``.
    """
    model = model if model is not None else parts.transformer
    transformer = parts.transformer
    device, dtype = transformer.device, transformer.dtype
    target, condition = batch["target"], batch["condition"]
    height, width = target.shape[-2:]
    indices = [int(i) for i in batch["index"]]
    # target and condition through the encoder as one batch (one call, a larger GEMM; each sample keeps its draw)
    generators = [sample_generator(settings.seed, epoch, i, tag) for tag in ("vae", "vae_condition") for i in indices]
    x0, cond = encode_posterior(parts.vae, torch.cat([target, condition]), generators).chunk(2)
    _, t_host, noise = _draws(batch, settings, epoch, tuple(x0.shape[1:]))
    x0, cond, t, noise = x0.to(device), cond.to(device), t_host.to(device), noise.to(device)
    x_t = losses.noisy_latents(x0, noise, t)
    ids = image_ids(height, width, device=device, vae_scale=vae_scale_factor(parts.vae))
    velocity = model(x_t.to(dtype), t.to(dtype), text=batch_text(parts, batch["drop_text"], device, dtype),
                     img_ids=ids, condition=cond.to(dtype), id_tokens=batch["id_tokens"].to(device, dtype),
                     guidance=torch.ones_like(t, dtype=dtype)).float()
    fm = losses.flow_matching_loss(velocity, noise, x0)
    # logged as tensors and read once at the end: each read waits for the GPU, which then idles while the host
    # queues the next kernels
    total, terms = fm, {"loss/fm": fm.detach(), "t/mean": t.mean()}
    for name, weight, term in _auxiliary_losses(parts, batch, settings, x_t, t_host, velocity):
        total = total + weight * term
        terms[name] = term.detach()
    terms["loss/total"] = total.detach()
    logs = dict(zip(terms, torch.stack([value.float() for value in terms.values()]).tolist()))
    return total, logs


def _auxiliary_losses(parts: TrainParts, batch: dict[str, Any], settings: Any, x_t: torch.Tensor,
                      t_host: torch.Tensor, velocity: torch.Tensor) -> list[tuple[str, float, torch.Tensor]]:
    """(log name, weight, term) of the ID and LPIPS losses, on the decoded x0 estimate of the gated samples only."""
    use_id = parts.id_loss is not None and settings.id_loss_weight > 0
    use_lpips = parts.lpips is not None and settings.lpips_weight > 0
    gate = max(settings.id_loss_max_t if use_id else -1.0, settings.lpips_max_t if use_lpips else -1.0)
    picked = (t_host <= gate).nonzero().flatten()  # on the host: no wait for the GPU before the decode
    if not len(picked):
        return []
    device = velocity.device
    t_sel = t_host[picked].to(device)
    source = batch["source"][picked].to(device) if use_id else None
    real = batch["target"][picked].to(device) * 2 - 1 if use_lpips else None
    size = tuple(batch["target"].shape[-2:])
    if settings.recompute_aux_losses and torch.is_grad_enabled():  # without grad nothing is kept: batched call
        per_id, per_lpips = _recomputed_aux_terms(parts, x_t, t_sel, velocity, picked, source, real, size)
    else:
        chosen = picked.to(device)
        per_id, per_lpips = _aux_terms(parts, x_t[chosen], t_sel, velocity[chosen], source, real, size)
    found = []
    if use_id:
        found.append(("loss/id", settings.id_loss_weight, losses.gated_mean(per_id, t_sel, settings.id_loss_max_t)))
    if use_lpips:
        found.append(("loss/lpips", settings.lpips_weight,
                      losses.gated_mean(per_lpips, t_sel, settings.lpips_max_t)))
    return found


def _aux_terms(parts: TrainParts, x_t: torch.Tensor, t: torch.Tensor, velocity: torch.Tensor,
               source: torch.Tensor | None, real: torch.Tensor | None,
               size: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Per-sample ID and LPIPS losses (None where off) of the decoded x0 estimates: one function for the batched
    path and for each checkpointed sample, so both compute the same thing."""
    decoded = decode_differentiable(parts.vae, losses.predicted_x0(x_t, t, velocity), *size)
    per_id = parts.id_loss(((decoded + 1) / 2).clamp(0, 1), source) if source is not None else None
    per_lpips = parts.lpips(decoded, real.to(decoded.dtype)).flatten() if real is not None else None
    return per_id, per_lpips


def _recomputed_aux_terms(parts: TrainParts, x_t: torch.Tensor, t_sel: torch.Tensor, velocity: torch.Tensor,
                          picked: torch.Tensor, source: torch.Tensor | None, real: torch.Tensor | None,
                          size: tuple[int, int]) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``_aux_terms`` one gated sample at a time, each in its own checkpoint region (``recompute_aux_losses``):
    the forward keeps only the regions' inputs and the backward recomputes one sample's decoder and loss-network
    activations at a time, so the peak no longer grows with the number of gated samples."""
    rows = []
    for k, i in enumerate(picked.tolist()):
        one = slice(k, k + 1)
        rows.append(checkpoint(_aux_terms, parts, x_t[i:i + 1], t_sel[one], velocity[i:i + 1],
                               None if source is None else source[one], None if real is None else real[one], size,
                               use_reentrant=False))
    per_id, per_lpips = zip(*rows)
    return (None if source is None else torch.cat(per_id)), (None if real is None else torch.cat(per_lpips))


def training_step(parts: TrainParts, batch: dict[str, Any], settings: Any, optimizer: torch.optim.Optimizer, *,
                  epoch: int = 0, accelerator: Any = None, model: nn.Module | None = None) -> dict[str, float]:
    """One optimizer step on ``batch``: loss, backward, clip to ``max_grad_norm``, AdamW step, zero grads.

    With an ``accelerator`` under ``accelerator.accumulate`` the step and clipping follow its sync points.
    """
    params = [p for p in parts.transformer.parameters() if p.requires_grad]
    loss, logs = compute_loss(parts, batch, settings, epoch=epoch, model=model)
    grad_norm = None
    if accelerator is not None:
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(params, settings.max_grad_norm)
    else:
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, settings.max_grad_norm)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    if grad_norm is not None:  # read after the update is queued: the GPU does not wait for the host in between
        logs["grad_norm"] = float(grad_norm)
    return logs


def example_batch(batch_size: int, resolution: int = 512, id_dim: int = 2048, seed: int = 0) -> dict[str, Any]:
    """A batch with the training shapes (random images and ID tokens) for speed and memory benchmarks."""
    generator = torch.Generator().manual_seed(seed)
    images = [torch.rand(batch_size, 3, resolution, resolution, generator=generator) for _ in range(3)]
    return {"target": images[0], "condition": images[1], "source": images[2],
            "id_tokens": torch.randn(batch_size, 32, id_dim, generator=generator),
            "drop_text": torch.zeros(batch_size, dtype=torch.bool), "index": torch.arange(batch_size)}
