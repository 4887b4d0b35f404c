"""Confidence intervals and significance tests over per-pair metric values, from ``scipy.stats``.

Every number in a report carries a 95% percentile-bootstrap interval (``scipy.stats.bootstrap``). ``eval compare``
scores the same pairs in both runs, so it uses paired tests: the paired t-test (``scipy.stats.ttest_rel``) decides
"significant" (p < alpha) and gives the interval of the mean difference, which excludes zero exactly when p < alpha;
the Wilcoxon signed-rank test (``scipy.stats.wilcoxon``) is reported beside it as a check that does not assume
normal differences.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import numpy as np
from scipy import stats as sps

DEFAULT_RESAMPLES = 1000
DEFAULT_SEED = 0
DEFAULT_ALPHA = 0.05
INTERVAL_METHOD = "percentile bootstrap"
PAIRED_TEST = "paired t-test"


def _clean(values: np.ndarray | list[float]) -> np.ndarray:
    array = np.asarray(values, dtype=np.float64).ravel()
    return array[np.isfinite(array)]


def bootstrap_mean(values, *, resamples: int = DEFAULT_RESAMPLES, seed: int = DEFAULT_SEED,
                   level: float = 0.95) -> dict[str, float | int | None]:
    """Mean of the finite values with a percentile-bootstrap interval; NaNs (not scorable) are counted as missing."""
    raw = np.asarray(values, dtype=np.float64).ravel()
    array = _clean(raw)
    result: dict[str, float | int | None] = {"mean": None, "ci_low": None, "ci_high": None, "n": int(array.size),
                                             "missing": int(raw.size - array.size)}
    if array.size == 0:
        return result
    result["mean"] = float(array.mean())
    if array.size < 2 or resamples < 2:
        return result
    if np.ptp(array) == 0:  # every resample has the same mean
        result.update(ci_low=result["mean"], ci_high=result["mean"])
        return result
    interval = sps.bootstrap((array,), np.mean, n_resamples=resamples, confidence_level=level,
                             method="percentile", random_state=np.random.default_rng(seed)).confidence_interval
    result.update(ci_low=float(interval.low), ci_high=float(interval.high))
    return result


def bootstrap_statistic(count: int, statistic: Callable[[np.ndarray], float], *, resamples: int = 20,
                        seed: int = DEFAULT_SEED, level: float = 0.95) -> tuple[float | None, float | None]:
    """Percentile interval of a set statistic (FID, KID) over resampled item indices; few resamples since each
    costs a full statistic. ``statistic`` receives an index array."""
    if count < 2 or resamples < 2:
        return None, None
    interval = sps.bootstrap((np.arange(count),), statistic, n_resamples=resamples, confidence_level=level,
                             method="percentile", vectorized=False,
                             random_state=np.random.default_rng(seed)).confidence_interval
    return float(interval.low), float(interval.high)


def paired_test(a, b, *, alpha: float = DEFAULT_ALPHA) -> dict[str, float | int | bool | str | None]:
    """B - A over the pairs scored in both: mean difference, its (1 - alpha) t-interval, the paired t-test p-value,
    the Wilcoxon signed-rank p-value, and ``significant`` = (t-test p < alpha)."""
    a = np.asarray(a, dtype=np.float64).ravel()
    b = np.asarray(b, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise ValueError(f"paired_test: a and b must have the same length, got {a.size} and {b.size}")
    keep = np.isfinite(a) & np.isfinite(b)
    a, b = a[keep], b[keep]
    diff = b - a
    result: dict[str, float | int | bool | str | None] = {
        "diff": float(diff.mean()) if diff.size else None, "ci_low": None, "ci_high": None, "p_value": None,
        "p_wilcoxon": None, "n": int(diff.size), "significant": False, "test": PAIRED_TEST, "alpha": alpha}
    if diff.size < 2:
        return result
    if np.ptp(diff) == 0:  # identical differences: no spread, t is infinite (p -> 0) or 0/0 when all are zero
        p_value = 0.0 if diff[0] != 0 else 1.0
        result.update(ci_low=float(diff[0]), ci_high=float(diff[0]), p_value=p_value, significant=p_value < alpha)
        return result
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        test = sps.ttest_rel(b, a)
        interval = test.confidence_interval(confidence_level=1.0 - alpha)
    p_value = float(test.pvalue)
    result.update(ci_low=float(interval.low), ci_high=float(interval.high), p_value=p_value,
                  significant=bool(np.isfinite(p_value) and p_value < alpha))
    if np.any(diff != 0):
        result["p_wilcoxon"] = float(sps.wilcoxon(diff).pvalue)
    return result

