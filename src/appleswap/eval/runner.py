"""The evaluation run: pairs -> cached per-image features -> per-pair metrics -> summary with 95% intervals."""

from __future__ import annotations

import datetime
import logging
from pathlib import Path

import numpy as np

from appleswap.config import config_to_dict
from appleswap.eval import fid as fid_metric
from appleswap.eval import stats
from appleswap.eval.cache import FeatureCache
from appleswap.eval.features import Extractor, Job, compute_faces, extract_all, id_mask
from appleswap.eval.gaze import gaze_error
from appleswap.eval.identity import failed_queries, identity_scores
from appleswap.eval.lighting import lighting_difference
from appleswap.eval.masks import SKIN_CLASSES, FaceMasker, select
from appleswap.eval.networks import (
    WeightPaths,
    expression_extractor,
    gaze_extractor,
    identity_extractors,
    inception_extractor,
    parser_from_registry,
    pose_extractor,
)
from appleswap.eval.pairs import Pair, load_pairs
from appleswap.eval.report_html import DESCRIPTIONS, LOWER_IS_BETTER, MISSING_SWAP_RULE, unit_of
from appleswap.eval.settings import EvalConfig
from appleswap.eval.skin import skin_tone_difference
from appleswap.face_metrics.pose import pose_error
from appleswap.files import is_image_path

log = logging.getLogger(__name__)

REPORT_VERSION = 2  # 2: retrieval in % (was a fraction), excluded pairs, identity failures counted in the means
IDENTITY_METRICS = ("id_sim", "id_top1", "id_top5")


def _reference_images(folder: str | None, limit: int) -> list[Path]:
    if not folder:
        return []
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"--reference: {root} is not a folder")
    files = sorted(p for p in root.rglob("*") if p.is_file() and is_image_path(p))
    if not files:
        raise FileNotFoundError(f"--reference: no images in {root}")
    return files[:limit] if limit > 0 else files


def _features(extractor: Extractor, pairs: list[Pair], faces: dict, cache: FeatureCache, config: EvalConfig):
    """Features for sources, targets and swaps (swaps masked by their target's record when the metric masks)."""
    def swap_job(pair: Pair) -> Job:
        masked_by = pair.target if extractor.uses_mask and config.id_mask_from == "target" else None
        return Job(pair.swap, masked_by)

    jobs = [Job(p.source) for p in pairs] + [Job(p.target) for p in pairs]
    jobs += [swap_job(p) for p in pairs if p.swap is not None]
    found = extract_all(extractor, jobs, cache, faces, config.batch_size)
    return lambda path, pair=None: found[swap_job(pair) if pair is not None else Job(path)]


def _per_pair_basic(pairs: list[Pair], faces: dict, pose_f, expr_f, gaze_f) -> dict[str, np.ndarray]:
    """Pose, expression, gaze, skin and lighting per pair (NaN where the swap or a face is missing)."""
    values = {name: np.full(len(pairs), np.nan) for name in ("pose", "expression", "gaze", "skin", "lighting")}
    for i, pair in enumerate(pairs):
        if pair.swap is None:
            continue
        swap_pose, target_pose = pose_f(None, pair)["angles"], pose_f(pair.target)["angles"]
        values["pose"][i] = pose_error(swap_pose, target_pose)
        expression = expr_f(None, pair)["coefficients"] - expr_f(pair.target)["coefficients"]
        values["expression"][i] = np.linalg.norm(expression)
        values["gaze"][i] = gaze_error(gaze_f(None, pair)["vector"], gaze_f(pair.target)["vector"])[0]
        target_face, swap_face = faces[pair.target], faces[pair.swap]
        skin = select(target_face["classes"], SKIN_CLASSES)
        values["skin"][i] = skin_tone_difference(swap_face["thumb"], target_face["thumb"], skin)
        values["lighting"][i] = lighting_difference(swap_face["thumb"], target_face["thumb"], id_mask(target_face))
    return values


def _set_metrics(pairs: list[Pair], inception: Extractor | None, config: EvalConfig,
                 cache: FeatureCache) -> dict[str, dict]:
    """FID and KID of the swaps against the reference folder, with few-resample bootstrap intervals."""
    reference = _reference_images(config.reference, config.reference_limit)
    swaps = [p.swap for p in pairs if p.swap is not None]
    if inception is None or not reference or len(swaps) < 2:
        reason = "no Inception weights" if inception is None else "no --reference folder or < 2 swaps"
        return {name: {"mean": None, "note": f"not computed: {reason}"} for name in ("fid", "kid")}
    found = extract_all(inception, [Job(p) for p in swaps + reference], cache, {}, config.batch_size)
    a = np.stack([found[Job(p)]["pool3"] for p in swaps]).astype(np.float64)
    b = np.stack([found[Job(p)]["pool3"] for p in reference]).astype(np.float64)
    mu_b, sigma_b = fid_metric.reference_statistics(b)
    functions = {"fid": lambda x, subsets: fid_metric.frechet_from_statistics(x, mu_b, sigma_b),
                 "kid": lambda x, subsets: fid_metric.kernel_inception_distance(x, b, subsets=subsets)}
    out = {}
    for name, function in functions.items():
        # KID's own subset averaging is cut to 10 inside each bootstrap resample to keep intervals affordable
        low, high = stats.bootstrap_statistic(len(a), lambda idx, fn=function: fn(a[idx], 10),
                                              resamples=config.set_resamples)
        out[name] = {"mean": function(a, 100), "ci_low": low, "ci_high": high, "n": len(a), "reference": len(b),
                     "resamples": config.set_resamples}
    return out


def _exclude_unreadable(pairs: list[Pair], unreadable: dict[Path, str], excluded: list[dict]) -> list[Pair]:
    """Pairs whose every file could be read; the others go to ``excluded`` with the reason (and a warning)."""
    kept = []
    for pair in pairs:
        bad = [f"{role} {unreadable[path]}" for role, path in (("source", pair.source), ("target", pair.target),
                                                               ("swap", pair.swap)) if path in unreadable]
        if bad:
            excluded.append({"id": pair.id, "reason": "; ".join(bad)})
            log.warning("pair %s excluded: %s", pair.id, "; ".join(bad))
        else:
            kept.append(pair)
    return kept


def _empty_report(config: EvalConfig, device: str, total: int, excluded: list[dict]) -> dict:
    """The report when no pair could be scored: what was excluded and why."""
    return {"report_version": REPORT_VERSION, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "config": config_to_dict(config), "device": device, "pairs": 0, "pairs_listed": total,
            "excluded": excluded, "swaps_found": 0, "missing_swaps": 0, "missing_swaps_rule": MISSING_SWAP_RULE,
            "networks": {}, "fallbacks": [], "cache": {}, "metrics": {}, "per_pair": []}


def _label_metrics(summary: dict[str, dict], identity_failures: dict[str, int], expression_fallback: bool) -> None:
    """Unit, direction, description and (identity metrics) the failure count of every metric entry."""
    for name, entry in summary.items():
        base = name.split("/")[0]
        entry["unit"] = unit_of(name)
        if base in IDENTITY_METRICS:
            entry["failures"] = identity_failures[name.split("/")[1]]
        entry.setdefault("higher_is_better", base not in LOWER_IS_BETTER)
        entry.setdefault("what", DESCRIPTIONS.get(base, "") + (" (fallback: mesh ratios, other units)"
                                                               if base == "expression" and expression_fallback
                                                               else ""))


def evaluate(config: EvalConfig, paths: WeightPaths, device: str = "cpu") -> dict:
    """Score every pair and return the report dict (written by the caller).

    A pair with a missing, unreadable or too small source, target or swap file is excluded and listed with its
    reason under ``excluded``; the others are still scored. A missing swap file is not excluded: it is a failure
    of the swap method (see ``MISSING_SWAP_RULE``)."""
    excluded: list[dict] = []
    pairs = load_pairs(config.pairs, config.swapped, config.sources, config.targets, excluded=excluded)
    total = len(pairs) + len(excluded)
    cache = FeatureCache(config.cache or Path(config.out) / "cache")
    masker = FaceMasker(config.parser_weights or parser_from_registry(paths), device)
    images = list(dict.fromkeys([p.source for p in pairs] + [p.target for p in pairs] +
                                [p.swap for p in pairs if p.swap is not None]))
    unreadable: dict[Path, str] = {}
    faces = compute_faces(images, masker, cache, unreadable)
    pairs = _exclude_unreadable(pairs, unreadable, excluded)
    if not pairs:
        return _empty_report(config, device, total, excluded)
    recognisers = identity_extractors(paths, device, config.id_mask_from)
    pose_x, gaze_x = pose_extractor(paths, device), gaze_extractor()
    expr_x = expression_extractor(paths, device, config.expression_mode)
    per_pair: dict[str, np.ndarray] = {}
    networks = {"mask": "BiSeNet face parser" if masker.source == "parser" else "MediaPipe mesh (embedded fallback)"}
    identity_failures: dict[str, int] = {}
    for recogniser in recognisers:
        lookup = _features(recogniser, pairs, faces, cache, config)
        per_pair.update(identity_scores(recogniser.name, pairs, lookup))
        identity_failures[recogniser.name] = failed_queries(pairs, lookup)
        networks[f"identity/{recogniser.name}"] = recogniser.label
    lookups = [_features(x, pairs, faces, cache, config) for x in (pose_x, expr_x, gaze_x)]
    per_pair.update(_per_pair_basic(pairs, faces, *lookups))
    networks.update(pose=pose_x.label, expression=expr_x.label, gaze=gaze_x.label)
    inception = inception_extractor(paths, device)
    networks["fid"] = inception.label if inception else "missing weights"
    summary = {name: stats.bootstrap_mean(values, resamples=config.bootstrap) for name, values in per_pair.items()}
    summary.update(_set_metrics(pairs, inception, config, cache))
    _label_metrics(summary, identity_failures, expression_fallback=expr_x.fallback)
    rows = [{"id": p.id, "source": str(p.source), "target": str(p.target), "swap": str(p.swap) if p.swap else None,
             **{name: _finite(values[i]) for name, values in per_pair.items()}} for i, p in enumerate(pairs)]
    log.info("feature cache: %d hits, %d computed", cache.hits, cache.misses)
    return {"report_version": REPORT_VERSION, "created": datetime.datetime.now(datetime.timezone.utc).isoformat(),
            "config": config_to_dict(config), "device": device, "pairs": len(pairs), "pairs_listed": total,
            "excluded": excluded, "swaps_found": sum(p.swap is not None for p in pairs),
            "missing_swaps": sum(p.swap is None for p in pairs), "missing_swaps_rule": MISSING_SWAP_RULE,
            "networks": networks,
            "fallbacks": sorted([x.name for x in [*recognisers, pose_x, expr_x] if x.fallback] +
                                (["mask_mesh"] if masker.source == "mesh" else [])),
            "cache": {"folder": str(cache.root), "hits": cache.hits, "computed": cache.misses},
            "metrics": summary, "per_pair": rows}


def _finite(value: float) -> float | None:
    return float(value) if np.isfinite(value) else None
