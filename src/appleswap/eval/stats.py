"""Confidence intervals and significance tests over per-pair metric values.

Every number in a report carries a 95% percentile-bootstrap interval; ``eval compare`` uses a paired bootstrap of
the mean difference plus a sign-flip permutation test, because both runs score the same pairs.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0


def _clean(values: np.ndarray | list[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def bootstrap_mean(values, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   level: float = 0.95) -> dict[str, float | int | None]:
    """Mean of the finite values with a percentile-bootstrap interval; NaNs (failed detections) are counted."""
    raw = np.asarray(values, dtype=np.float64).ravel()
    array = _clean(raw)
    result: dict[str, float | int | None] = {"mean": None, "ci_low": None, "ci_high": None, "n": int(array.size),
                                             "missing": int(raw.size - array.size)}
    if array.size == 0:
        return result
    rng = np.random.default_rng(seed)
    index = rng.integers(0, array.size, size=(resamples, array.size))
    means = array[index].mean(axis=1)
    alpha = (1.0 - level) / 2.0
    result.update(mean=float(array.mean()), ci_low=float(np.quantile(means, alpha)),
                  ci_high=float(np.quantile(means, 1.0 - alpha)))
    return result


def bootstrap_statistic(count: int, statistic: Callable[[np.ndarray], float], *, resamples: int = 20,
                        seed: int = DEFAULT_SEED, level: float = 0.95) -> tuple[float | None, float | None]:
    """Interval of a set statistic (FID, KID) by resampling item indices; few resamples since each is costly."""
    if count < 2 or resamples < 2:
        return None, None
    rng = np.random.default_rng(seed)
    values = [statistic(rng.integers(0, count, size=count)) for _ in range(resamples)]
    alpha = (1.0 - level) / 2.0
    return float(np.quantile(values, alpha)), float(np.quantile(values, 1.0 - alpha))


def paired_difference(a, b, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                      level: float = 0.95) -> dict[str, float | int | bool | None]:
    """Mean of b - a over pairs present in both, its bootstrap interval and a two-sided sign-flip p-value.

    ``significant`` is True when the interval excludes zero (and then p < 1 - level as well, up to Monte-Carlo
    noise).
    """
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_difference: a and b must have the same length, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    diff = b[keep] - a[keep]
    if diff.size == 0:
        return {"diff": None, "ci_low": None, "ci_high": None, "p_value": None, "n": 0, "significant": False}
    interval = bootstrap_mean(diff, resamples=resamples, seed=seed, level=level)
    rng = np.random.default_rng(seed + 1)
    signs = rng.choice(np.array([-1.0, 1.0]), size=(resamples, diff.size))
    null = np.abs((signs * diff).mean(axis=1))
    observed = abs(diff.mean())
    p_value = float((1 + np.count_nonzero(null >= observed - 1e-15)) / (resamples + 1))
    low, high = interval["ci_low"], interval["ci_high"]
    significant = bool(low is not None and (low > 0 or high < 0))
    return {"diff": float(diff.mean()), "ci_low": low, "ci_high": high, "p_value": p_value, "n": int(diff.size),
            "significant": significant}
