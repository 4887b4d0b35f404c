"""The one place where speed and memory options attach to a loaded model.

A reader of the method needs none of this: :mod:`appleswap.model.transformer` is the whole model, plain. Every
option here either keeps the function (fused projections, regional ``torch.compile``, CUDA graphs, per-swap
constants; the equivalence tests in ``tests/speed/`` compare each with the reference forward) or changes the numerics
on purpose and says so (fp8 block weights). A caller names a profile and gets the same function back, faster or
smaller:

============ =========================================================================================
profile      options
============ =========================================================================================
``eager``    none: the reference :class:`~appleswap.model.transformer.AppleTransformer`, layer by layer
``compiled`` fused projections, regional ``torch.compile`` and whole-pass CUDA graphs (GPU only)
``fp8``      ``compiled`` plus e4m3 block weights with row-wise scales (half the memory, slightly different numbers)
``offload``  fp8 blocks kept in host memory and streamed to the GPU one by one (about 3.4 GiB peak at FLUX size)
============ =========================================================================================

How they attach: :func:`attach_speed` wraps the reference model in a
:class:`~appleswap.speed.transformer.FastAppleTransformer` (same modules, a forward that computes the same) and
switches its options on in the order that works; the pipeline gets each swap's shared inputs from
:class:`~appleswap.speed.passes.SwapPasses`. Training attaches through the reference model's ``block_functions``
(:func:`compile_block_functions`).
"""

from __future__ import annotations

import dataclasses
from typing import get_args

import torch

from appleswap.config import SpeedProfile  # one spelling, shared with the commands' --speed
from appleswap.model.transformer import AppleTransformer
from appleswap.speed.transformer import FastAppleTransformer, compile_block_functions, uncompile_block_functions
from appleswap.speed.vae import compile_vae, graph_vae_encoder

SPEED_PROFILES: tuple[str, ...] = get_args(SpeedProfile)
__all__ = ["SPEED_PROFILES", "SpeedOptions", "SpeedProfile", "attach_speed", "compile_block_functions",
           "speed_options", "uncompile_block_functions"]


@dataclasses.dataclass(frozen=True)
class SpeedOptions:
    fp8: bool = False  # e4m3 block weights (changes numerics slightly)
    offload: str = "none"  # "none" | "model" (VAE on the host between uses) | "sequential" (+ transformer blocks)
    fuse: bool = False  # stacked q/k/v/MLP-in GEMMs with the condition LoRA folded in (same function)
    compile: bool | str = False  # regional torch.compile of the blocks (True or a mode; GPU only)
    cuda_graphs: bool = False  # each pass replayed as one CUDA graph (GPU only)


_PROFILES = {
    "eager": SpeedOptions(),
    "compiled": SpeedOptions(fuse=True, compile=True, cuda_graphs=True),
    "fp8": SpeedOptions(fp8=True, fuse=True, compile=True, cuda_graphs=True),
    "offload": SpeedOptions(fp8=True, offload="sequential"),
}


def speed_options(profile: str) -> SpeedOptions:
    """The options of a named profile; ValueError naming the allowed ones otherwise."""
    if profile not in _PROFILES:
        raise ValueError(f"speed profile {profile!r} is unknown; choose one of {', '.join(SPEED_PROFILES)}")
    return _PROFILES[profile]


def attach_speed(transformer: AppleTransformer, device, *, fp8: bool = False, offload: str = "none",
                 fuse: bool = True, compile: bool | str = False, cuda_graphs: bool = False,
                 vae=None) -> AppleTransformer:
    """fp8 block weights and/or sequential block offload for a transformer loaded on the CPU (or already on
    ``device``): quantised block by block on ``device`` (with merged fp8 condition weights unless offloaded), then
    everything resident placed there. Then the options that keep the function: fused projections, regional
    ``torch.compile`` (True or a mode) and CUDA graphs; without offload also ``vae``'s (compiled, encoder graphed).
    ``attach_speed(model, device, **dataclasses.asdict(speed_options("fp8")))`` applies a profile. Returns the
    model to call: ``transformer`` itself (on ``device``) when no option is on, else a
    :class:`~appleswap.speed.transformer.FastAppleTransformer` sharing its modules."""
    if not (fp8 or fuse or compile or cuda_graphs or offload == "sequential"):
        return transformer.to(device)
    transformer = FastAppleTransformer.from_reference(transformer)
    if fp8:
        on_host = offload == "sequential"  # blocks copied in every pass: no merged condition weights to copy
        transformer.quantize_fp8(device=None if on_host else device, merge_condition=not on_host)
    if offload == "sequential":
        transformer.enable_sequential_offload(device)
    else:
        transformer.place(device)
    if fuse and offload != "sequential":
        transformer.fuse_projections()
    on_cuda = torch.device(device).type == "cuda"  # compile and graphs pay off on GPUs only
    own_vae = vae is not None and offload == "none"  # a VAE that stays on the GPU
    if compile and on_cuda:
        transformer.compile_blocks(mode=compile if isinstance(compile, str) else None)
        if own_vae:
            compile_vae(vae)
    if cuda_graphs and on_cuda and offload != "sequential":
        transformer.enable_cuda_graphs()
        if own_vae:
            graph_vae_encoder(vae)
    return transformer
