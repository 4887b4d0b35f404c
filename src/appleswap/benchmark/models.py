"""The benchmark's models and inputs: FLUX.1 (or a tiny config) with random weights built on the device, the APPLE
transformer around it, random latents, condition, text and ID tokens, and one pass of each forward."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel

from appleswap.benchmark.settings import BenchConfig
from appleswap.benchmark.utils import init_random_
from appleswap.model.id_attention import build_id_attentions, id_attention_layout
from appleswap.model.latents import image_ids
from appleswap.model.transformer import TextEmbeddings
from appleswap.pipeline import SwapPipeline
from appleswap.speed.transformer import FastAppleTransformer

FULL_FLUX = {"num_layers": 19, "num_single_layers": 38, "attention_head_dim": 128, "num_attention_heads": 24,
                 "joint_attention_dim": 4096, "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56)}



TINY_FLUX = {"num_layers": 2, "num_single_layers": 4, "attention_head_dim": 16, "num_attention_heads": 2,
                 "joint_attention_dim": 32, "pooled_projection_dim": 32, "guidance_embeds": True, "axes_dims_rope": (4, 4, 8)}



FULL_VAE = {"block_out_channels": (128, 256, 512, 512), "layers_per_block": 2, "norm_num_groups": 32}



TINY_VAE = {"block_out_channels": (32, 32), "layers_per_block": 1, "norm_num_groups": 8}



def build_models(cfg: BenchConfig, device, dtype):
    """(plain FLUX, VAE) with random weights, created on ``meta`` and materialised on the device."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # materialise directly in bf16 (no fp32 copy of 12 B parameters)
    try:
        with torch.device("meta"):
            flux = FluxTransformer2DModel(**(TINY_FLUX if cfg.tiny else FULL_FLUX))
    finally:
        torch.set_default_dtype(previous)
    flux = flux.to_empty(device=device)
    init_random_(flux)
    return flux.eval().requires_grad_(False), build_vae(cfg, device, dtype)



def build_vae(cfg: BenchConfig, device, dtype):
    """The FLUX VAE (16 latent channels, shift and scale) with diffusers' random initialisation."""
    vae_extra = TINY_VAE if cfg.tiny else FULL_VAE
    blocks = len(vae_extra["block_out_channels"])
    vae = AutoencoderKL(in_channels=3, out_channels=3, latent_channels=16, down_block_types=("DownEncoderBlock2D",) *
                        blocks, up_block_types=("UpDecoderBlock2D",) * blocks, scaling_factor=0.3611,
                        shift_factor=0.1159, use_quant_conv=False, use_post_quant_conv=False, **vae_extra)
    return vae.to(device=device, dtype=dtype).eval().requires_grad_(False)



def build_apple(flux, cfg: BenchConfig, id_dim: int):
    """The APPLE transformer around ``flux``: 20 ID cross-attentions (random) and a fresh rank-r LoRA."""
    doubles, singles = id_attention_layout(len(flux.transformer_blocks), len(flux.single_transformer_blocks))
    heads, head_dim = (2, 16) if cfg.tiny else (16, 128)  # PuLID: 16 x 128 = 2048 inner
    attentions = build_id_attentions(len(doubles) + len(singles), flux.inner_dim, id_dim, heads, head_dim)
    attentions = attentions.to(device=flux.device, dtype=flux.dtype)
    init_random_(attentions, seed=1)
    model = FastAppleTransformer(flux, attentions)
    model.add_lora(rank=cfg.lora_rank, init="gaussian")
    model.flux.to(device=flux.device, dtype=flux.dtype)
    return model.eval().requires_grad_(False)



def make_inputs(cfg: BenchConfig, flux, batch: int, size: int):
    """Random latents, condition, text and ID tokens for ``batch`` images of ``size`` pixels."""
    device, dtype = flux.device, flux.dtype
    scale = 2 if cfg.tiny else 8
    ids = image_ids(size, size, device=device, vae_scale=scale)
    length = ids.shape[0]
    text_len = 8 if cfg.tiny else cfg.text_tokens
    text = TextEmbeddings(torch.randn(1, text_len, flux.config.joint_attention_dim, device=device, dtype=dtype),
                          torch.randn(1, flux.config.pooled_projection_dim, device=device, dtype=dtype),
                          torch.zeros(text_len, 3, device=device))
    x, cond = (torch.randn(batch, length, 64, device=device, dtype=dtype) for _ in range(2))
    id_tokens = torch.randn(batch, 32, 64 if cfg.tiny else 2048, device=device, dtype=dtype)
    return {"x": x, "cond": cond, "text": text, "ids": ids, "id_tokens": id_tokens,
                "t": torch.full((batch,), 0.7, device=device), "g": torch.ones(batch, device=device)}



def apple_pass(model, inp, modulation=None, timestep_rows=None, constants=None):
    return model(inp["x"], inp["t"], text=inp["text"], img_ids=inp["ids"], condition=inp["cond"],
                 id_tokens=None if constants is not None else inp["id_tokens"], guidance=inp["g"],
                 modulation=modulation, timestep_modulation=timestep_rows, constants=constants)



def swap_constants(model, inp):
    """The pass's per-swap constants (prompt embedding, RoPE, ID keys/values) as a swap computes them."""
    return model.pass_constants(inp["text"], inp["ids"], inp["id_tokens"], condition=True)



def pass_timestep_rows(model, inp, modulation=None):
    """The main tokens' AdaLN rows of the benchmark pass's timestep, precomputed as a swap does (with the
    condition's ``modulation`` rows beside them, as a swap's step table holds them)."""
    rows = model.timestep_modulation(inp["t"][:1], inp["text"], float(inp["g"][0]))
    return (rows if modulation is None else model.joined_modulation(rows, modulation)).step(0)



def plain_pass(flux, inp):
    """Stock diffusers forward over the same tokens: [image; condition] as one image sequence."""
    x = torch.cat([inp["x"], inp["cond"]], dim=1)
    return flux(hidden_states=x, encoder_hidden_states=inp["text"].prompt_embeds.expand(x.shape[0], -1, -1),
                pooled_projections=inp["text"].pooled.expand(x.shape[0], -1), timestep=inp["t"],
                img_ids=torch.cat([inp["ids"], inp["ids"]]), txt_ids=inp["text"].text_ids, guidance=inp["g"]).sample



def student_pipeline(model, vae, inp):
    return SwapPipeline(model, vae, inp["text"], "student", null_id=inp["id_tokens"][:1].clone())
