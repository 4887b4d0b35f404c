"""The fixed prompt's CLIP-L and T5 embeddings, computed once and cached as safetensors.

APPLE always uses one prompt ("a photo of human face"), so the two text encoders (about 10 GB for T5-XXL) need
not stay in memory: the first call encodes the prompt and writes a cache file; later calls read it.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from appleswap.model.latents import text_ids
from appleswap.model.transformer import TextEmbeddings

logger = logging.getLogger(__name__)

DEFAULT_PROMPT = "a photo of human face"
CLIP_MAX_LENGTH = 77
TEXT_CACHE_FOLDER = "text_embeddings"


def cache_file(cache_dir: str | Path, flux_path: str | Path, prompt: str, max_sequence_length: int) -> Path:
    """Cache file for this model folder (its absolute path: one cache folder serves every weights folder), prompt and
    T5 length."""
    key = f"{Path(flux_path).resolve()}|{prompt}|{max_sequence_length}".encode()
    return Path(cache_dir) / f"text_{hashlib.sha256(key).hexdigest()[:20]}.safetensors"


def legacy_cache_files(flux_path: str | Path, prompt: str, max_sequence_length: int) -> list[Path]:
    """Where earlier versions wrote the cache inside the weights folder (read, never written: it may be read-only)."""
    flux = Path(flux_path)
    key = f"{flux.name}|{prompt}|{max_sequence_length}".encode()
    name = f"text_{hashlib.sha256(key).hexdigest()[:20]}.safetensors"
    return [flux.parent / "cache" / TEXT_CACHE_FOLDER / name, flux / "appleswap_text_cache" / name]


def save_text_embeddings(path: str | Path, text: TextEmbeddings, prompt: str) -> Path:
    from appleswap.files import save_tensors

    tensors = {"prompt_embeds": text.prompt_embeds.cpu(), "pooled": text.pooled.cpu(), "text_ids": text.text_ids.cpu()}
    return save_tensors(path, tensors, metadata={"prompt": prompt})


def read_text_embeddings(path: str | Path) -> TextEmbeddings:
    from safetensors.torch import load_file

    data = load_file(str(path))
    missing = {"prompt_embeds", "pooled", "text_ids"} - set(data)
    if missing:
        raise ValueError(f"text-embedding cache {path} lacks {sorted(missing)}; delete it to recompute")
    return TextEmbeddings(data["prompt_embeds"], data["pooled"], data["text_ids"])


@torch.no_grad()
def encode_prompt(flux_path: str | Path, prompt: str, max_sequence_length: int = 512,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> TextEmbeddings:
    """Run CLIP-L (pooled output) and T5 (last hidden state) from a diffusers FLUX folder, then free them."""
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    root = Path(flux_path)
    for sub in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
        if not (root / sub).is_dir():
            raise FileNotFoundError(f"{root / sub} not found: the FLUX folder needs it to encode the prompt "
                                    "(or provide the cached embeddings file)")
    tokenizer = AutoTokenizer.from_pretrained(root / "tokenizer")
    clip = CLIPTextModel.from_pretrained(root / "text_encoder", torch_dtype=dtype).to(device).eval()
    clip_ids = tokenizer([prompt], padding="max_length", max_length=min(CLIP_MAX_LENGTH, tokenizer.model_max_length),
                         truncation=True, return_tensors="pt").input_ids
    pooled = clip(clip_ids.to(device), output_hidden_states=False).pooler_output.to(dtype)  # (1, 768)
    del clip
    tokenizer_2 = AutoTokenizer.from_pretrained(root / "tokenizer_2")
    t5 = T5EncoderModel.from_pretrained(root / "text_encoder_2", torch_dtype=dtype).to(device).eval()
    length = min(max_sequence_length, tokenizer_2.model_max_length)
    t5_ids = tokenizer_2([prompt], padding="max_length", max_length=length, truncation=True,
                         return_tensors="pt").input_ids
    prompt_embeds = t5(t5_ids.to(device), output_hidden_states=False)[0].to(dtype)  # (1, T, 4096)
    del t5
    return TextEmbeddings(prompt_embeds, pooled, text_ids(prompt_embeds.shape[1], device=device))


def load_text_embeddings(flux_path: str | Path, prompt: str = DEFAULT_PROMPT, cache_dir: str | Path | None = None,
                         *, max_sequence_length: int = 512, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32) -> TextEmbeddings:
    """The prompt's embeddings (batch 1): from the cache when present, else encoded once and cached.

    Args:
        flux_path: the diffusers FLUX folder (its text encoders are only loaded on a cache miss).
        cache_dir: where cache files live (None: ``files.cache_dir("text_embeddings")``, i.e. under
            ``$APPLESWAP_CACHE``; never the weights folder, which may be read-only).
    """
    from appleswap.files import cache_dir as user_cache_dir

    cache_dir = Path(cache_dir) if cache_dir is not None else user_cache_dir(TEXT_CACHE_FOLDER)
    path = cache_file(cache_dir, flux_path, prompt, max_sequence_length)
    for found in [path, *legacy_cache_files(flux_path, prompt, max_sequence_length)]:
        if found.is_file():
            logger.debug("text embeddings from cache %s", found)
            return read_text_embeddings(found).to(device=device, dtype=dtype)
    logger.info("encoding the prompt %r once (cache: %s)", prompt, path)
    text = encode_prompt(flux_path, prompt, max_sequence_length, device=device, dtype=torch.float32)
    save_text_embeddings(path, text, prompt)
    return text.to(device=device, dtype=dtype)
