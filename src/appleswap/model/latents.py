"""VAE latents as FLUX token sequences: encode images to packed tokens, decode tokens back, position ids.

FLUX works on 2x2 patches of the 16-channel VAE latent: a 512x512 image becomes 64x64x16 latents and then
1024 tokens of 64 values. These helpers keep that bookkeeping in one place so the pipeline, training and the
tests agree on the packing order (the same order as diffusers' ``FluxPipeline._pack_latents``).
"""

from __future__ import annotations

import torch

from appleswap.devices import upload


def placement(module: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a model's first weight (e.g. the VAE's ``encoder.conv_in``); diffusers' ``.device`` and
    ``.dtype`` walk every submodule looking for hooks on each call."""
    weight = next(module.parameters())
    return weight.device, weight.dtype


def vae_conv_flags():
    """cuDNN autotuning for the VAE's convolutions (fixed shapes per job: the fastest algorithm is searched once per
    shape); other cuDNN settings as they are. Restored on exit."""
    cudnn = torch.backends.cudnn
    return cudnn.flags(enabled=cudnn.enabled, benchmark=True, deterministic=cudnn.deterministic,
                       allow_tf32=cudnn.allow_tf32)


def vae_scale_factor(vae) -> int:
    """Pixels per latent cell (8 for the FLUX VAE): 2 ** (number of resolution levels - 1)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) latents -> (B, H/2 * W/2, C*4) tokens of 2x2 patches."""
    batch, channels, height, width = latents.shape
    if height % 2 or width % 2:
        raise ValueError(f"latent height and width must be even, got {height}x{width}")
    patches = latents.view(batch, channels, height // 2, 2, width // 2, 2)
    patches = patches.permute(0, 2, 4, 1, 3, 5)  # (B, H/2, W/2, C, 2, 2)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    """(B, L, C*4) tokens -> (B, C, H, W) latents; the inverse of :func:`pack_latents`."""
    batch, length, width4 = tokens.shape
    if length != (latent_height // 2) * (latent_width // 2):
        raise ValueError(f"{length} tokens do not tile a {latent_height}x{latent_width} latent in 2x2 patches")
    channels = width4 // 4
    patches = tokens.view(batch, latent_height // 2, latent_width // 2, channels, 2, 2)
    patches = patches.permute(0, 3, 1, 4, 2, 5)  # (B, C, H/2, 2, W/2, 2)
    return patches.reshape(batch, channels, latent_height, latent_width)


def _latent_size(height: int, width: int, scale: int) -> tuple[int, int]:
    if height % (2 * scale) or width % (2 * scale):
        raise ValueError(f"image size {height}x{width} must be a multiple of {2 * scale} (2 x the VAE scale factor)")
    return height // scale, width // scale


def image_ids(height: int, width: int, device=None, dtype=torch.float32, *, vae_scale: int = 8) -> torch.Tensor:
    """RoPE position ids (L, 3) of the image tokens: [0, row, col] over the token grid of a height x width image."""
    latent_h, latent_w = _latent_size(height, width, vae_scale)
    rows, cols = latent_h // 2, latent_w // 2
    ids = torch.zeros(rows, cols, 3, device=device, dtype=dtype)
    ids[..., 1] = torch.arange(rows, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(cols, device=device, dtype=dtype)[None, :]
    return ids.reshape(rows * cols, 3)


def text_ids(length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """Text tokens all sit at position zero (FLUX convention): (T, 3) zeros."""
    return torch.zeros(length, 3, device=device, dtype=dtype)


@torch.no_grad()
def encode_images(vae, images: torch.Tensor, sample: bool = False, generator: torch.Generator | None = None):
    """Images (B, 3, H, W) in [0, 1] -> packed, shifted and scaled latent tokens (B, L, 64).

    ``sample=False`` takes the posterior mode (the inversion target, deterministic); ``sample=True`` draws from
    the posterior with ``generator`` as the reference does for training and condition latents.
    """
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"images must be (B, 3, H, W), got {tuple(images.shape)}")
    _latent_size(images.shape[2], images.shape[3], vae_scale_factor(vae))
    device, dtype = placement(vae)
    pixels = (images.to(device=device, dtype=dtype) * 2.0 - 1.0).clamp(-1.0, 1.0)
    graph = getattr(vae, "apple_encoder_graph", None)
    if graph is not None:  # replayed on CUDA (elsewhere it runs the encoder as it is)
        from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

        posterior = DiagonalGaussianDistribution(graph(pixels))
    else:
        posterior = vae.encode(pixels).latent_dist
    latents = posterior.sample(generator) if sample else posterior.mode()
    shift = vae.config.shift_factor or 0.0
    latents = (latents - shift) * vae.config.scaling_factor
    return pack_latents(latents)


@torch.no_grad()
def decode_tokens(vae, tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Packed latent tokens (B, L, 64) -> images (B, 3, height, width) in [0, 1] (float32)."""
    latent_h, latent_w = _latent_size(height, width, vae_scale_factor(vae))
    device, dtype = placement(vae)
    latents = unpack_latents(tokens, latent_h, latent_w).to(device=device, dtype=dtype)
    shift = vae.config.shift_factor or 0.0
    latents = latents / vae.config.scaling_factor + shift
    images = vae.decode(latents).sample
    return ((images.float() + 1.0) / 2.0).clamp(0.0, 1.0)


def prepare_noise(batch: int, height: int, width: int, *, generator: torch.Generator | None = None,
                  vae_scale: int = 8, channels: int = 16, device=None, dtype=torch.float32) -> torch.Tensor:
    """Gaussian start latents as packed tokens (B, L, 64), drawn exactly as ``FluxPipeline.prepare_latents`` does.

    The noise is drawn on the generator's device (CPU for the reference's ``Generator('cpu').manual_seed(0)``)
    in ``dtype`` and then moved, so a seed gives the same noise on every machine.
    """
    latent_h, latent_w = _latent_size(height, width, vae_scale)
    gen_device = generator.device if generator is not None else torch.device("cpu")
    noise = torch.randn((batch, channels, latent_h, latent_w), generator=generator, device=gen_device, dtype=dtype)
    return pack_latents(upload(noise, device))
