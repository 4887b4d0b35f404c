"""SwapPipeline: aligned 512 faces in, swapped 512 faces out (APPLE teacher or student).

    pipe = SwapPipeline.from_pretrained(weights_dir="~/weights", mode="student")
    swapped = pipe(source="alice.safetensors", target=target_rgb)      # (1, 512, 512, 3) uint8

``source`` is ID tokens (a tensor), an identity file, or photos of the source person (encoded by the identity
stage). ``target`` is the aligned target; the teacher also needs ``condition`` (the blurred-face + landmarks
image) and usually runs with ``invert=True`` (attribute-aware inversion, docs/method.md: Inversion).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch

from appleswap.devices import pick_device, upload
from appleswap.files import images_to_tensor
from appleswap.model.latents import (
    decode_tokens,
    encode_images,
    image_ids,
    placement,
    prepare_noise,
    vae_conv_flags,
    vae_scale_factor,
)
from appleswap.model.loading import load_apple_transformer, load_vae
from appleswap.model.text import DEFAULT_PROMPT, load_text_embeddings
from appleswap.model.transformer import AppleTransformer, TextEmbeddings
from appleswap.parity import parity_settings
from appleswap.sampling import (
    get_schedule,
    inversion_sigmas,
    invert,
    sample_euler,
    sample_midpoint,
    with_batched_guidance,
)
from appleswap.sampling.schedule import schedule_from_scheduler_config
from appleswap.sampling.seeds import derived_seed
from appleswap.speed import SpeedProfile, attach_speed, speed_options
from appleswap.speed.offload import check_tier
from appleswap.speed.passes import SwapPasses
from appleswap.weights import locate
from appleswap.weights import weights_dir as resolve_weights_dir

logger = logging.getLogger(__name__)

Mode = Literal["student", "teacher"]
InverseCond = Literal["noID_trgCond", "noID_noCond", "trgID_noCond", "trgID_trgCond"]
INVERSE_CONDS = ("noID_trgCond", "noID_noCond", "trgID_noCond", "trgID_trgCond")
DEFAULT_VIT_TOKENS = 577  # EVA02-CLIP-L-336: 24 x 24 patches + CLS (shapes the null ID)




@dataclasses.dataclass
class SwapPipeline:
    """The assembled model; call it to swap. Build with :meth:`from_pretrained`."""

    transformer: AppleTransformer
    vae: torch.nn.Module
    text: TextEmbeddings
    mode: Mode = "student"
    null_id: torch.Tensor | None = None  # (1, 32, D) PuLID uncond tokens
    scheduler_config: dict = dataclasses.field(default_factory=dict)
    weights_dir: Path | None = None
    identity_encoder: Any = None  # appleswap.identity.encoder.IdentityEncoder, loaded on first photo source
    offload: str = "none"  # "none" | "model" (VAE on the host between uses) | "sequential" (+ transformer blocks)
    compute_device: torch.device | None = None  # where the VAE runs when offloaded (default: the transformer's)
    passes_cache: SwapPasses | None = dataclasses.field(default=None, repr=False)  # see passes
    id_dtype: str = "float32"  # identity encoder precision; --parity (appleswap.parity): the release's bfloat16
    black_condition: Literal["mode", "sample"] = "mode"  # image guidance's black latent (release: a sample)
    inversion_order: int = 1  # default of __call__'s inversion_order (release FFHQ teacher script: 2)
    parity_wrong_midpoint: bool = False  # default of __call__'s parity_wrong_midpoint (release: True)

    @classmethod
    def from_pretrained(cls, weights_dir: str | Path | None = None, mode: Mode = "student", *,
                        flux_path: str | Path | None = None, pulid_path: str | Path | None = None,
                        lora_path: str | Path | None = None, device: str | None = None,
                        dtype: torch.dtype = torch.bfloat16, prompt: str = DEFAULT_PROMPT,
                        text_cache_dir: str | Path | None = None, max_sequence_length: int = 512,
                        null_id: torch.Tensor | str | Path | None = None,
                        vit_tokens: int = DEFAULT_VIT_TOKENS, fp8: bool = False,
                        offload: str = "none", fuse: bool = True, compile: bool | str = False,
                        cuda_graphs: bool = False, parity: bool = False,
                        speed: SpeedProfile | None = None) -> SwapPipeline:
        """Load FLUX, PuLID ID cross-attentions, the mode's LoRA and the cached prompt through the registry.

        Args:
            weights_dir: the weights folder (``--weights-dir`` / ``$APPLESWAP_HOME``).
            mode: ``student`` (clean target as condition) or ``teacher`` (condition image, usually with inversion).
            flux_path / pulid_path / lora_path: explicit files that win over the registry locations.
            null_id: null-ID tokens or an identity file; default: PuLID's IDFormer on zero inputs.
            fp8 / offload / fuse / compile / cuda_graphs: speed and memory options (:mod:`appleswap.speed`): e4m3
                block weights (changes numerics slightly); ``none`` | ``model`` (VAE in host memory between uses) |
                ``sequential`` (also the blocks); stacked projection GEMMs; regional ``torch.compile`` (True or a
                mode name; also the VAE); whole-pass CUDA graphs. The last three keep the function.
            parity: the release's behaviour where ours differs (``appleswap.parity`` rows ``pipeline``).
            speed: a named profile (``eager``: the reference model; ``compiled``; ``fp8``; ``offload``:
                :mod:`appleswap.speed`) instead of the five options above.
        """
        if speed is not None:
            fp8, offload, fuse, compile, cuda_graphs = dataclasses.astuple(speed_options(speed))
        if mode not in ("student", "teacher"):
            raise ValueError(f"mode must be 'student' or 'teacher', got {mode!r}")
        device = pick_device(device)
        check_tier(offload)
        root = resolve_weights_dir(weights_dir)
        flux, pulid = locate("flux", weights_dir, explicit=flux_path), locate("pulid_flux", weights_dir, explicit=pulid_path)
        lora = locate(f"apple_{mode}", weights_dir, explicit=lora_path)
        transformer = load_apple_transformer(flux, pulid_path=pulid, lora_path=lora, dtype=dtype,
                                             device="cpu" if fp8 or offload == "sequential" else device)
        vae = load_vae(flux, dtype=dtype, device="cpu" if offload != "none" else device)
        transformer = attach_speed(transformer, device, fp8=fp8, offload=offload, fuse=fuse, compile=compile,
                                   cuda_graphs=cuda_graphs, vae=vae)
        text = load_text_embeddings(flux, prompt, text_cache_dir, max_sequence_length=max_sequence_length,
                                    device=device, dtype=dtype)
        scheduler_file = Path(flux) / "scheduler" / "scheduler_config.json"
        scheduler_config = json.loads(scheduler_file.read_text()) if scheduler_file.is_file() else {}
        pipe = cls(transformer, vae, text, mode, None, scheduler_config, root, offload=offload,
                   compute_device=torch.device(device), **(parity_settings("pipeline") if parity else {}))
        pipe.null_id = pipe._load_null_id(null_id, pulid, vit_tokens)
        return pipe

    def _load_null_id(self, null_id, pulid: Path, vit_tokens: int) -> torch.Tensor | None:
        from appleswap.identity.store import load_identity

        if isinstance(null_id, torch.Tensor):
            return null_id.reshape(1, *null_id.shape[-2:])
        if null_id is not None:
            return load_identity(null_id)[0]
        from appleswap.identity.idformer import IDFormer

        try:
            return IDFormer.from_file(pulid).null_tokens(vit_tokens).float().cpu()
        except ValueError as error:
            logger.warning("no null ID (%s): inversion with 'noID_*' and id_guidance_scale need null_id=", error)
            return None

    @property
    def device(self) -> torch.device:
        return self.compute_device or self.transformer.device

    @contextlib.contextmanager
    def _vae(self):
        """Context giving the VAE on the compute device (moved in and out with ``offload`` != none), with cuDNN
        autotuning for its convolutions."""
        from appleswap.speed.offload import ModelOffloader

        place = (contextlib.nullcontext(self.vae) if self.offload == "none"
                 else ModelOffloader(self.device).use(self.vae))
        with vae_conv_flags(), place as vae:
            yield vae

    # ---- inputs
    def encode_source(self, source: Any) -> torch.Tensor:
        """ID tokens (B or 1, 32, D) from a tensor, an identity file, or photos of one person."""
        from appleswap.identity.store import load_identity

        if isinstance(source, torch.Tensor):
            return source[None] if source.ndim == 2 else source
        if isinstance(source, (str, Path)) and str(source).endswith(".safetensors"):  # an identity file
            return load_identity(source)[0]
        if self.identity_encoder is None:
            from appleswap.identity.encoder import IdentityEncoder

            self.identity_encoder = IdentityEncoder.from_pretrained(self.weights_dir, device=str(self.device),
                                                                    dtype=getattr(torch, self.id_dtype))
        photos = images_to_tensor(source, "source")
        arrays = [(p.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8) for p in photos]
        return self.identity_encoder.encode_identity(arrays)

    def encode_latents(self, images: torch.Tensor, sample: bool, seeds: Sequence[int]) -> torch.Tensor:
        """VAE tokens (B, L, 64); ``sample`` draws from the posterior with a per-image seeded generator."""
        rows = []
        with self._vae() as vae:
            for image, seed in zip(images, seeds):
                generator = torch.Generator(placement(vae)[0]).manual_seed(seed) if sample else None
                rows.append(encode_images(vae, image[None], sample=sample, generator=generator))
        return torch.cat(rows).to(self.transformer.dtype)

    # ---- the denoiser
    @property
    def passes(self) -> SwapPasses:
        """What the swap's passes share (:mod:`appleswap.speed.passes`; nothing for the reference model)."""
        cached = self.passes_cache
        if cached is None or cached.transformer is not self.transformer or cached.text is not self.text:
            self.passes_cache = cached = SwapPasses(self.transformer, self.text, self.device)
        return cached

    def denoiser(self, condition: torch.Tensor | None, id_tokens: torch.Tensor | None, positions: torch.Tensor,
                 *, guidance_scale: float = 1.0, image_guidance_scale: float = 1.0, id_guidance_scale: float = 1.0,
                 black: torch.Tensor | None = None, id_weight: float = 1.0, kv_cache: bool = False,
                 steps=None):
        """``model(x, sigma) -> velocity`` with conditions bound; guidance passes stacked into one batch.

        ``steps``: the main tokens' modulation rows for every call of the solver (``self.passes.step_table``).

        ``kv_cache``: independent-condition mode (condition tokens attend to themselves only), their keys and
        values computed once here and reused at every step. Not the released model's setting.
        """
        variants = [(condition, id_tokens)]
        if image_guidance_scale != 1.0:
            if condition is None or black is None:
                raise ValueError("image_guidance_scale != 1 needs a condition")
            variants.append((black.expand_as(condition), id_tokens))
        if id_guidance_scale != 1.0:
            if self.null_id is None or id_tokens is None:
                raise ValueError("id_guidance_scale != 1 needs ID tokens and the null ID")
            variants.append((condition, self.null_id.to(id_tokens).expand_as(id_tokens)))
        conds = None if condition is None else torch.cat([c for c, _ in variants])
        variant_ids = None if id_tokens is None else [i for _, i in variants]
        shared = self.passes.bind(conds, variant_ids, positions, kv_cache, steps)
        ids_by_batch = {}  # the variants' ID tokens stacked, per batch size

        def multi(x: torch.Tensor, sigma: torch.Tensor) -> list[torch.Tensor]:
            n, batch = len(variants), x.shape[0]
            timestep = sigma.to(x.dtype).repeat(n)
            if variant_ids is not None and batch not in ids_by_batch:
                ids_by_batch[batch] = torch.cat([i.expand(batch, -1, -1) for i in variant_ids])
            ids = ids_by_batch.get(batch)
            inputs = {"text": self.text, "img_ids": positions, "condition": conds, "id_tokens": ids,
                      "guidance": torch.full_like(timestep, guidance_scale), "id_weight": id_weight,
                      "independent_condition": kv_cache}
            velocity = self.transformer(x.repeat(n, 1, 1), timestep, **{**inputs, **shared(batch, sigma)})
            return list(velocity.chunk(n))

        return with_batched_guidance(multi, image_guidance_scale, id_guidance_scale)

    def schedule(self, num_steps: int, image_seq_len: int) -> torch.Tensor:
        if self.scheduler_config:
            return schedule_from_scheduler_config(self.scheduler_config, num_steps, image_seq_len)
        return get_schedule(num_steps, image_seq_len)

    # ---- swapping
    @torch.no_grad()
    def __call__(self, source: Any, target: Any, *, condition: Any = None, invert: bool = False,
                 num_steps: int = 28, inverse_steps: int | None = None, inverse_cond: InverseCond = "noID_trgCond",
                 inversion_order: int | None = None, parity_wrong_midpoint: bool | None = None, sampler_order: int = 1,
                 guidance_scale: float = 1.0, image_guidance_scale: float = 1.0, id_guidance_scale: float = 1.0,
                 seed: int | Sequence[int] = 0, id_weight: float = 1.0, target_id: Any = None, kv_cache: bool = False,
                 progress: bool = False, callback: Any = None, output_type: Literal["np", "pt"] = "np"):
        """Swap ``source``'s identity into ``target``.

        Args:
            source: ID tokens (32, D) / (B, 32, D), an identity ``.safetensors`` file, or photo(s) of one person.
            target: aligned target(s): uint8 (H, W, 3) arrays, paths, or a (B, 3, H, W) tensor in [0, 1].
            condition: the condition image(s) (teacher: required; student: default = the clean target).
            invert: attribute-aware inversion of the target before regeneration (docs/method.md: Inversion).
            inverse_steps: inversion depth in steps (default ``num_steps``; fewer = partial, resumed correctly).
            inverse_cond: conditions during inversion (``noID_trgCond`` = attribute-only, the paper's choice).
            inversion_order / sampler_order: 1 = Euler (reference), 2 = midpoint (default: the pipeline's, 1).
            parity_wrong_midpoint: reproduce the reference's ``--second_order`` inversion (default: the pipeline's).
            guidance_scale: FLUX distilled guidance for text and image (the condition always gets 1).
            image_guidance_scale / id_guidance_scale: guidance against a black condition / the null ID.
            seed: noise seed, one for all images or one per image (the reference uses 0 for every image).
            target_id: the target's ID (tokens, file or photos) for ``trgID_*`` inversion (default: from target).
            kv_cache: independent-condition mode with cached condition keys/values (faster; not the paper's model).
        Returns:
            uint8 (B, H, W, 3) array (``np``) or float (B, 3, H, W) tensor in [0, 1] (``pt``).
        """
        if inverse_cond not in INVERSE_CONDS:
            raise ValueError(f"inverse_cond must be one of {INVERSE_CONDS}, got {inverse_cond!r}")
        if self.mode == "teacher" and condition is None:
            raise ValueError("teacher mode needs condition= (the target's blurred-face + landmarks image)")
        dtype, device = self.transformer.dtype, self.device
        targets = images_to_tensor(target, "target").to(device)
        conditions = targets if condition is None else images_to_tensor(condition, "condition").to(device)
        if conditions.shape != targets.shape:
            raise ValueError(f"condition {tuple(conditions.shape)} and target {tuple(targets.shape)} differ in size")
        batch, _, height, width = targets.shape
        seeds = [seed] * batch if isinstance(seed, int) else list(seed)
        if len(seeds) != batch:
            raise ValueError(f"seed: {len(seeds)} seeds for {batch} images")
        id_tokens = self._batch_ids(self.encode_source(source), batch, "source")
        positions = image_ids(height, width, device=device, vae_scale=vae_scale_factor(self.vae))
        cond_tokens = self.encode_latents(conditions, sample=True, seeds=[derived_seed(s, "condition") for s in seeds])
        black = None
        if image_guidance_scale != 1.0:
            black = self.encode_latents(torch.zeros_like(targets[:1]), sample=self.black_condition == "sample",
                                        seeds=[derived_seed(seeds[0], "black_condition")])
        sigmas = self.schedule(num_steps, positions.shape[0])
        if invert:
            sigmas = inversion_sigmas(sigmas, inverse_steps or num_steps)
            x = self._invert(targets, cond_tokens, positions, sigmas, inverse_cond, target_id,
                             (inversion_order, parity_wrong_midpoint, kv_cache), progress, callback)
        else:
            x = torch.cat([prepare_noise(1, height, width, generator=torch.Generator().manual_seed(s),
                                         vae_scale=vae_scale_factor(self.vae), dtype=dtype) for s in seeds])
            x = upload(x, device)  # queued: the host goes on while the GPU encodes
        steps = self.passes.step_table(sigmas, sampler_order, guidance_scale=guidance_scale, condition=not kv_cache)
        model = self.denoiser(cond_tokens, id_tokens, positions, guidance_scale=guidance_scale,
                              image_guidance_scale=image_guidance_scale, id_guidance_scale=id_guidance_scale,
                              black=black, id_weight=id_weight, kv_cache=kv_cache, steps=steps)
        sampler = sample_euler if sampler_order == 1 else sample_midpoint
        tokens = sampler(model, x, sigmas, callback=callback, disable=not progress)  # sigmas on the CPU: no GPU wait
        with self._vae() as vae:
            images = decode_tokens(vae, tokens, height, width)
        if steps is not None:
            steps.verify()  # the host waits here, after queueing the decode behind the last steps
        if output_type == "pt":
            return images
        return (images.permute(0, 2, 3, 1).cpu().numpy() * 255).round().astype(np.uint8)

    def _batch_ids(self, tokens: torch.Tensor | None, batch: int, name: str) -> torch.Tensor | None:
        if tokens is None or not len(self.transformer.id_attentions):
            return None
        if tokens.shape[0] not in (1, batch):
            raise ValueError(f"{name}: {tokens.shape[0]} identities for {batch} targets (give 1 or {batch})")
        return tokens.to(self.device, self.transformer.dtype).expand(batch, -1, -1)

    def _invert(self, targets, cond_tokens, positions, sigmas, inverse_cond, target_id, solver, progress, callback):
        """Attribute-aware inversion (docs/method.md: Inversion), step A: the target latent (VAE mode) integrated from data to noise under ``inverse_cond``."""
        batch = targets.shape[0]
        if inverse_cond.startswith("noID"):
            if self.null_id is None and len(self.transformer.id_attentions):
                raise ValueError(f"inverse_cond={inverse_cond!r} needs the null ID (pass null_id= to from_pretrained)")
            ids = self._batch_ids(self.null_id, batch, "null_id")
        else:
            ids = self._batch_ids(self.encode_source(target_id if target_id is not None else targets), batch,
                                  "target_id")
        condition = cond_tokens if inverse_cond.endswith("trgCond") else None
        x0 = self.encode_latents(targets, sample=False, seeds=[0] * batch)
        order, parity, kv_cache = solver
        order = self.inversion_order if order is None else order  # None: the pipeline's (--parity: 2, its midpoint)
        parity = self.parity_wrong_midpoint and order == 2 if parity is None else parity
        steps = self.passes.step_table(sigmas, order, inverse=True, condition=condition is not None and not kv_cache)
        model = self.denoiser(condition, ids, positions, kv_cache=kv_cache, steps=steps)  # guidance 1 (reference)
        x = invert(model, x0, sigmas, order=order, parity_wrong_midpoint=parity, callback=callback, disable=not progress)
        if steps is not None:
            steps.verify()
        return x
