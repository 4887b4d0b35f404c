"""The one place where speed and memory options attach to a loaded model.

A reader of the method needs none of this: every option here either keeps the function (fused projections,
regional ``torch.compile``, CUDA graphs; the equivalence tests in ``tests/model/`` compare each with the plain path)
or changes the numerics on purpose and says so (fp8 block weights). A caller names a profile and gets the same
function back, faster or smaller:

=========== ==========================================================================================
profile     options
=========== ==========================================================================================
``eager``   none: the reference path, layer by layer as ``AppleTransformer.forward`` reads
``compiled`` fused projections, regional ``torch.compile`` and whole-pass CUDA graphs (GPU only)
``fp8``     ``compiled`` plus e4m3 block weights with row-wise scales (half the memory, slightly different numbers)
``offload`` fp8 blocks kept in host memory and streamed to the GPU one by one (about 3.4 GiB peak at FLUX size)
=========== ==========================================================================================

The model classes keep their own switches (``quantize_fp8``, ``fuse_projections``, ``compile_blocks``,
``enable_cuda_graphs``, ``enable_sequential_offload``); this module decides their order and which combine.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, get_args

import torch

from appleswap.model.latents import compile_vae, graph_vae_encoder
from appleswap.model.transformer import AppleTransformer

SpeedProfile = Literal["eager", "compiled", "fp8", "offload"]
SPEED_PROFILES: tuple[str, ...] = get_args(SpeedProfile)


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
    ``attach_speed(model, device, **dataclasses.asdict(speed_options("fp8")))`` applies a profile."""
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
