"""``--parity``: one preset that makes appleswap do what the authors' released scripts do, quirks included.

The defaults are the corrected behaviour; where they change numbers against the release (cvlab-kaist/APPLE), the
row below restores the release. ``--parity`` on ``preprocess``, ``generate``, ``swap``, ``pseudo``,
``prepare-ids`` and ``identity`` sets every row of its command; ``SwapPipeline.from_pretrained(parity=True)``
sets the ``pipeline`` rows (which ``generate``, ``swap`` and ``pseudo`` pass on). docs/fidelity.md explains
each row, says why the default differs and how large the difference is where measured.
"""

from __future__ import annotations

import dataclasses
import logging
from typing import Any

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class ParitySetting:
    """``name`` (a config field of each command in ``commands``, or a SwapPipeline attribute for ``pipeline``)
    becomes ``value`` under ``--parity``; ``when`` limits it to configs whose fields have those values."""

    name: str
    value: Any
    commands: tuple[str, ...]
    release: str  # what the authors' code does (spec apple_release.md)
    when: tuple[tuple[str, Any], ...] = ()


PARITY: tuple[ParitySetting, ...] = (
    # preprocess: the condition script vgg_preprocess_seg_mask_gaze_multigpu_samsung.py + 3DDFA-V3 (docs/fidelity.md: `--parity`)
    ParitySetting("parser", "auto", ("preprocess",), "face mask from the BiSeNet parser FaceParser.pth",
                  when=(("parser", None),)),
    ParitySetting("occlusion", "auto", ("preprocess",), "mask AND the DeepLabV3+ visible-face prediction",
                  when=(("occlusion", None),)),
    ParitySetting("landmarks", "3ddfa-v3", ("preprocess",), "68 points projected from a 3DDFA-V3 fit",
                  when=(("landmarks", "mediapipe"),)),
    ParitySetting("parser_double_norm", True, ("preprocess",),
                  "parser input normalised twice: ImageNet mean/std, then (x - 0.5) / 0.5 (SpecificNorm)"),
    ParitySetting("occlusion_flip", "only", ("preprocess",),
                  "occlusion model sees only the mirrored image (patched mmcv MultiScaleFlipAug)"),
    # generate: pulid_omini_inference_ffhq_[inversion_]args_multigpu.py and the committed .sh (docs/fidelity.md: `--parity`)
    ParitySetting("invert", True, ("generate",), "the teacher is evaluated with attribute-aware inversion",
                  when=(("mode", "teacher"),)),
    ParitySetting("inverse_cond", "noID_trgCond", ("generate",), "inversion with the null ID and the condition"),
    ParitySetting("inverse_steps", None, ("generate",), "inversion depth = the 28 sampling steps"),
    ParitySetting("inversion_order", 2, ("generate", "pipeline"), "--second_order in the committed .sh"),
    ParitySetting("parity_wrong_midpoint", True, ("generate", "pipeline"),
                  "its midpoint velocity is taken at the current latent (mid_sample unused)"),
    ParitySetting("num_steps", 28, ("generate", "pseudo"), "28 steps, fixed"),
    ParitySetting("steps", 28, ("swap",), "28 steps, fixed"),
    ParitySetting("seed", 0, ("generate", "swap"), "Generator('cpu').manual_seed(0) for every image"),
    ParitySetting("size", 512, ("generate", "swap"), "512 x 512"),
    ParitySetting("kv_cache", False, ("generate",), "condition attends to text and image (kv_cache=False)"),
    ParitySetting("fp8", False, ("generate", "swap", "pseudo"), "bf16 weights, no fp8"),
    ParitySetting("dtype", "bf16", ("generate",), "everything in bf16"),
    ParitySetting("dtype", "bf16", ("swap",), "everything in bf16"),
    # the model as the scripts build it (SwapPipeline.from_pretrained(parity=True))
    ParitySetting("id_dtype", "bfloat16", ("pipeline",), "PuLID ID encoder (EVA-CLIP, IDFormer) in bf16"),
    ParitySetting("black_condition", "sample", ("pipeline",),
                  "image guidance's black condition latent is a posterior sample, not its mode"),
    # pseudo: pulid_omini_dataset_gen_fluxpseudovgg_multigpu.py (docs/fidelity.md); its inversion is first order
    ParitySetting("guidance", 1.0, ("pseudo",), "g = 1"),
    ParitySetting("aes_threshold", 5.1, ("pseudo",), "pool: aes > 5.1"),
    ParitySetting("num_pairs", 100_000, ("pseudo",), "the first 100,000 shuffled identity pairs"),
    ParitySetting("mixed_precision", "bf16", ("pseudo",), "bf16"),
    # prepare-ids / identity: get_id_embedding in bf16 (docs/fidelity.md)
    ParitySetting("dtype", "bf16", ("prepare-ids", "identity"), "PuLID ID encoder in bf16"),
)
COMMANDS = ("preprocess", "generate", "swap", "pseudo", "prepare-ids", "identity", "pipeline")


def parity_rows(command: str) -> list[ParitySetting]:
    """The rows ``--parity`` applies for ``command`` (one of COMMANDS)."""
    if command not in COMMANDS:
        raise ValueError(f"no parity preset for {command!r}; one of {COMMANDS}")
    return [row for row in PARITY if command in row.commands]


def parity_settings(command: str, current: Any = None) -> dict[str, Any]:
    """``{name: value}`` that ``--parity`` sets for ``command``; rows with ``when`` only where ``current`` (a
    config) matches it."""
    settings = {}
    for row in parity_rows(command):
        if all(getattr(current, field, object()) == value for field, value in row.when):
            settings[row.name] = row.value
    return settings


def apply_parity(config: Any, command: str) -> Any:
    """``config`` (a frozen dataclass with a ``parity`` field) with the preset applied when ``parity`` is on.

    The preset wins over other flags: ``--parity`` means "as the release", whatever else was asked."""
    if not getattr(config, "parity", False):
        return config
    settings = parity_settings(command, config)
    fields = {f.name for f in dataclasses.fields(config)}
    missing = sorted(set(settings) - fields)
    if missing:
        raise ValueError(f"parity preset for {command!r} names unknown settings {missing}")
    changed = {k: v for k, v in settings.items() if getattr(config, k) != v}
    if changed:
        log.info("--parity: %s", ", ".join(f"{k}={v!r}" for k, v in changed.items()))
    return dataclasses.replace(config, **settings)
