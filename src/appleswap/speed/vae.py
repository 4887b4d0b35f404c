"""VAE speed options: the encoder and decoder compiled in place, the encoder replayed as a CUDA graph.

Both keep the function; ``model.latents.encode_images`` replays the graph when ``vae.apple_encoder_graph`` is set.
"""

from __future__ import annotations

from appleswap.speed.cuda_graph import CudaGraphRunner


def compile_vae(vae, mode: str | None = None, decoder: bool = True):
    """``torch.compile`` the VAE's encoder and decoder in place (same modules, same state dict). Eager, their
    GroupNorms (statistics in one thread block per image and group: 32 blocks on a GPU of 132 SMs) take over half
    of a 512x512 encode + decode on an H100; compiled, the round trip took 14-17 ms instead of 35 ms there.

    ``decoder=False`` compiles the encoder alone: training encodes a fixed batch every step, but decodes only the
    samples whose t opens the ID / LPIPS gate, a batch size that changes from step to step (a recompile each)."""
    for part in (vae.encoder, vae.decoder) if decoder else (vae.encoder,):
        part.compile(mode=mode, dynamic=False)
    return vae


def graph_vae_encoder(vae, enabled: bool = True) -> None:
    """Run the VAE's encoder (to the posterior's parameters) as a CUDA graph per input shape
    (:class:`~appleswap.speed.cuda_graph.CudaGraphRunner`): launching its kernels one by one took as long as running
    them (~6 ms at 512x512 on an H100), so the host could not prepare a swap's sampling while the GPU encoded the
    target. Same function; for a VAE that stays on one GPU (not with ``offload``)."""
    if not enabled:
        vae.__dict__.pop("apple_encoder_graph", None)
        return
    vae.apple_encoder_graph = CudaGraphRunner(lambda pixels: vae.encode(pixels).latent_dist.parameters)
