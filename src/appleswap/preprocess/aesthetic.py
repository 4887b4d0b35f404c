"""LAION "improved aesthetic predictor" scores for the ``score.json`` data filter (docs/method.md), local files only.

score = MLP(L2-normalised CLIP ViT-L/14 image embedding). The MLP (768->1024->128->64->16->1, dropouts between the
first layers and no activations) is ``sac+logos+ava1-l14-linearMSE.pth`` from christophschuhmann/
improved-aesthetic-predictor (keys ``layers.0.weight`` ... ``layers.7.bias``); the same weights inside the imscore
checkpoint ``RE-N-Y/laion-aesthetic`` (``model.safetensors``, keys ``mlp.layers.*`` next to ``clip.*``) load too.
The CLIP tower is a transformers folder (``openai/clip-vit-large-patch14``) read with ``local_files_only=True``.

Preprocessing. ``preprocess="imscore"`` (default) reproduces the release, which scored through imscore: pixels in
[0, 1] as float, shorter side bicubic-resized (antialiased) to 224, centre crop 224, CLIP mean/std. The thresholds
used downstream (aes > 5.1) were set on those numbers. ``preprocess="processor"`` uses the folder's
CLIPImageProcessor instead (PIL resize, like the original LAION script); scores then differ slightly.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
CROP = 224
HIDDEN = (1024, 128, 64, 16)
PREPROCESS_MODES = ("imscore", "processor")


class AestheticHead(nn.Module):
    """The LAION MLP; Sequential indices 0/2/4/6/7 are the Linear layers (1/3/5 are dropouts)."""

    def __init__(self, embed_dim: int = 768) -> None:
        super().__init__()
        h1, h2, h3, h4 = HIDDEN
        self.layers = nn.Sequential(
            nn.Linear(embed_dim, h1), nn.Dropout(0.2), nn.Linear(h1, h2), nn.Dropout(0.2),
            nn.Linear(h2, h3), nn.Dropout(0.1), nn.Linear(h3, h4), nn.Linear(h4, 1),
        )

    def forward(self, embeds: torch.Tensor) -> torch.Tensor:
        return self.layers(embeds).squeeze(-1)


def read_head_state(path: str | Path) -> dict[str, torch.Tensor]:
    """``layers.*`` tensors from the original ``.pth`` or a safetensors file (plain or imscore ``mlp.`` prefix)."""
    from appleswap.faces.parsing import read_state_dict

    path = Path(path)
    state = read_state_dict(path)
    if any(k.startswith("mlp.layers.") for k in state):
        state = {k[len("mlp."):]: v for k, v in state.items() if k.startswith("mlp.layers.")}
    if "layers.0.weight" not in state:
        raise ValueError(f"{path}: not a LAION aesthetic head (no 'layers.0.weight' or 'mlp.layers.0.weight'; "
                         f"first keys: {sorted(state)[:5]})")
    return state


def load_head(path: str | Path) -> AestheticHead:
    from appleswap.faces.parsing import load_strict

    state = read_head_state(path)
    head = AestheticHead(int(state["layers.0.weight"].shape[1]))
    load_strict(head, state, Path(path), "LAION aesthetic MLP")
    return head.eval()


class AestheticScorer:
    """Scores RGB uint8 images on the LAION aesthetic scale (roughly 1-10)."""

    def __init__(self, clip: nn.Module, head: AestheticHead, device: torch.device, preprocess: str = "imscore",
                 processor=None, dtype: torch.dtype = torch.float32) -> None:
        if preprocess not in PREPROCESS_MODES:
            raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
        if preprocess == "processor" and processor is None:
            raise ValueError("preprocess='processor' needs a CLIPImageProcessor")
        self.clip = clip.eval().to(device, dtype)
        self.head = head.eval().to(device, torch.float32)
        self.device, self.dtype = device, dtype
        self.preprocess_mode, self.processor = preprocess, processor
        self._mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
        self._std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)

    @classmethod
    def from_files(cls, clip_dir: str | Path, head_path: str | Path, device: str | torch.device | None = None,
                   preprocess: str = "imscore", dtype: torch.dtype = torch.float32) -> AestheticScorer:
        """CLIP ViT-L/14 from a local transformers folder + the MLP head file; nothing is downloaded."""
        from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection

        clip_dir = Path(clip_dir)
        if not (clip_dir / "config.json").is_file():
            raise FileNotFoundError(f"clip_dir: {clip_dir} is not a transformers CLIP folder (no config.json)")
        clip = CLIPVisionModelWithProjection.from_pretrained(str(clip_dir), local_files_only=True)
        head = load_head(head_path)
        if clip.config.projection_dim != head.layers[0].in_features:
            raise ValueError(f"{head_path}: head expects {head.layers[0].in_features}-d embeddings but {clip_dir} "
                             f"projects to {clip.config.projection_dim}")
        processor = None
        if preprocess == "processor":
            processor = CLIPImageProcessor.from_pretrained(str(clip_dir), local_files_only=True)
        device = torch.device(device) if device is not None else torch.device(
            "cuda" if torch.cuda.is_available() else "cpu")
        logger.info("aesthetic scorer: CLIP %s + head %s on %s", clip_dir.name, Path(head_path).name, device)
        return cls(clip, head, device, preprocess=preprocess, processor=processor, dtype=dtype)

    def pixels(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, 3, 224, 224) normalised CLIP input for RGB uint8 images of any size."""
        for index, image in enumerate(images):
            if not isinstance(image, np.ndarray) or image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
                raise ValueError(f"images[{index}]: expected an RGB uint8 array (H, W, 3), "
                                 f"got {getattr(image, 'shape', type(image))}")
        if self.preprocess_mode == "processor":
            batch = self.processor(images=list(images), return_tensors="pt")["pixel_values"]
            return batch.to(self.device, torch.float32)
        return torch.cat([self._imscore_pixels(image) for image in images])

    def _imscore_pixels(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)[None].to(self.device, torch.float32)
        x = x / 255.0
        h, w = image.shape[:2]
        size = (CROP, int(CROP * w / h)) if h <= w else (int(CROP * h / w), CROP)  # torchvision Resize(224)
        if size != (h, w):
            x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        top, left = round((size[0] - CROP) / 2.0), round((size[1] - CROP) / 2.0)
        x = x[:, :, top:top + CROP, left:left + CROP]
        return (x - self._mean) / self._std

    @torch.inference_mode()
    def embed(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """(B, D) L2-normalised CLIP image embeddings (float32)."""
        embeds = self.clip(pixel_values=self.pixels(images).to(self.dtype)).image_embeds.float()
        return embeds / torch.linalg.vector_norm(embeds, dim=-1, keepdim=True)

    @torch.inference_mode()
    def score(self, images: Sequence[np.ndarray], batch_size: int = 16) -> list[float]:
        """One aesthetic score per image, in input order."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        scores: list[float] = []
        starts = range(0, len(images), batch_size)
        if len(images) > 4 * batch_size:
            from tqdm import tqdm

            starts = tqdm(starts, desc="aesthetic", unit="batch")
        for start in starts:
            scores.extend(self.head(self.embed(images[start:start + batch_size])).tolist())
        return scores
