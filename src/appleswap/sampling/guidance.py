"""Guidance as wrappers: each takes model callables and returns another ``model(x, sigma) -> velocity``.

APPLE's two optional guidances (docs/method.md: Guidance): image guidance against a black condition,
v = v_black + s_img (v - v_black), and ID guidance against the null ID, v = v_nullID + s_id (v - v_nullID).
The reference forbids both at once; here both may be combined (an extension) as
v = v + (s_img - 1)(v - v_black) + (s_id - 1)(v - v_nullID), which reduces to each formula alone.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# a model returning the full prediction followed by the requested null predictions, in one batched pass
MultiModel = Callable[[torch.Tensor, torch.Tensor], Sequence[torch.Tensor]]


def combine_guidance(velocity: torch.Tensor, null_image: torch.Tensor | None = None,
                     null_id: torch.Tensor | None = None, image_scale: float = 1.0,
                     id_scale: float = 1.0) -> torch.Tensor:
    """v + (s_img - 1)(v - v_black) + (s_id - 1)(v - v_nullID), skipping a term whose scale is 1."""
    out = velocity
    if image_scale != 1.0:
        if null_image is None:
            raise ValueError("image_scale != 1 needs the black-condition prediction")
        out = out + (image_scale - 1.0) * (velocity - null_image)
    if id_scale != 1.0:
        if null_id is None:
            raise ValueError("id_scale != 1 needs the null-ID prediction")
        out = out + (id_scale - 1.0) * (velocity - null_id)
    return out


def with_image_guidance(model: Model, null_image_model: Model, scale: float) -> Model:
    """v_black + scale (v - v_black); ``null_image_model`` is the same model with the black condition."""
    if scale == 1.0:
        return model

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return combine_guidance(model(x, sigma), null_image=null_image_model(x, sigma), image_scale=scale)

    return guided


def with_id_guidance(model: Model, null_id_model: Model, scale: float) -> Model:
    """v_nullID + scale (v - v_nullID); ``null_id_model`` is the same model with the null-ID tokens."""
    if scale == 1.0:
        return model

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return combine_guidance(model(x, sigma), null_id=null_id_model(x, sigma), id_scale=scale)

    return guided


def with_batched_guidance(multi_model: MultiModel, image_scale: float = 1.0, id_scale: float = 1.0) -> Model:
    """Both guidances from ONE batched call: ``multi_model`` returns (v, v_black?, v_nullID?) for the scales != 1.

    The pipeline's multi-model stacks the variants along the batch dimension, so the extra passes cost one
    larger transformer call instead of one call each.
    """

    def guided(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        outputs = list(multi_model(x, sigma))
        velocity = outputs.pop(0)
        null_image = outputs.pop(0) if image_scale != 1.0 else None
        null_id = outputs.pop(0) if id_scale != 1.0 else None
        return combine_guidance(velocity, null_image, null_id, image_scale, id_scale)

    return guided
