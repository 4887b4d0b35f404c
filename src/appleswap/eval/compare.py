"""``appleswap eval compare A.json B.json``: which metric differences between two runs are significant.

Per-pair metrics are compared on the pairs both reports scored with a paired t-test (``scipy.stats.ttest_rel``;
"significant" means p < alpha, and then its interval of the mean difference B - A excludes zero), with the Wilcoxon
signed-rank p-value beside it. Set metrics (FID, KID) have no pairing and no test here: the table only says whether
their bootstrap intervals overlap, and never calls them significant.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from appleswap.eval.report_html import LOWER_IS_BETTER, unit_of
from appleswap.eval.stats import DEFAULT_ALPHA, paired_test

SET_TEST = "interval overlap (no test)"


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report {path} does not exist")
    try:
        report = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not a JSON report ({error})") from error
    if not isinstance(report, dict) or "metrics" not in report or "per_pair" not in report:
        raise ValueError(f"{path} is not an appleswap eval report (no 'metrics' / 'per_pair')")
    return report


def _units_match(a: dict, b: dict) -> None:
    """Reports before version 2 stored retrieval as a fraction; mixing them with percent would be wrong."""
    if (a.get("report_version", 1) >= 2) != (b.get("report_version", 1) >= 2):
        raise ValueError("the two reports use different units (report_version 1 stored retrieval as a fraction, "
                         "2 as %); re-run `appleswap eval` for the older one (its feature cache makes that quick)")


def compare_reports(a: dict, b: dict, *, alpha: float = DEFAULT_ALPHA) -> list[dict]:
    """One row per metric present in both reports: difference, interval, p-values, significant, better."""
    _units_match(a, b)
    rows_a = {row["id"]: row for row in a["per_pair"]}
    rows_b = {row["id"]: row for row in b["per_pair"]}
    common = [pair_id for pair_id in rows_a if pair_id in rows_b]
    results = []
    for name in a["metrics"]:
        if name not in b["metrics"]:
            continue
        lower = name.split("/")[0] in LOWER_IS_BETTER
        if common and name in rows_a[common[0]]:
            values_a = np.array([np.nan if rows_a[i].get(name) is None else rows_a[i][name] for i in common])
            values_b = np.array([np.nan if rows_b[i].get(name) is None else rows_b[i][name] for i in common])
            result = paired_test(values_a, values_b, alpha=alpha)
        else:
            result = _set_difference(a["metrics"][name], b["metrics"][name])
        if result["diff"] is not None and result["diff"] != 0:
            result["better"] = "B" if (result["diff"] < 0) == lower else "A"
        results.append({"metric": name, "unit": unit_of(name), "a": a["metrics"][name].get("mean"),
                        "b": b["metrics"][name].get("mean"), **result, "verdict": verdict(result)})
    return results


def _set_difference(entry_a: dict, entry_b: dict) -> dict:
    base = {"ci_low": None, "ci_high": None, "p_value": None, "p_wilcoxon": None, "significant": False,
            "test": SET_TEST, "overlap": None}
    if entry_a.get("mean") is None or entry_b.get("mean") is None:
        return {**base, "diff": None, "n": 0, "test": "not computed"}
    overlap = None
    if None not in (entry_a.get("ci_low"), entry_b.get("ci_low")):
        overlap = not (entry_a["ci_high"] < entry_b["ci_low"] or entry_b["ci_high"] < entry_a["ci_low"])
    return {**base, "diff": entry_b["mean"] - entry_a["mean"], "n": entry_b.get("n", 0), "overlap": overlap}


def verdict(row: dict) -> str:
    """Words that say what the test found, and nothing it did not."""
    if row["test"] == SET_TEST:
        if row.get("overlap") is None:
            return "no interval: not tested"
        return "95% intervals overlap (no test)" if row["overlap"] else "95% intervals do not overlap (no test)"
    if row.get("p_value") is None:
        return "not tested (too few pairs or no variation)"
    alpha = row.get("alpha", DEFAULT_ALPHA)
    if row["significant"]:
        return f"significant (p < {alpha:g}), {row.get('better')} better"
    return f"not significant (p >= {alpha:g})"


def format_comparison(results: list[dict], name_a: str = "A", name_b: str = "B") -> str:
    """Plain-text table for the terminal."""
    lines = [(f"{'metric':<26} {'unit':<8} {name_a[:12]:>12} {name_b[:12]:>12} {'B-A':>9} {'95% CI of B-A':>21} "
             f"{'p (t)':>7} {'p (W)':>7}  verdict")]
    for row in results:
        def num(value, width=12):
            return f"{value:>{width}.4f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

        def prob(value):
            return f"{value:.4f}" if value is not None else "-"

        interval = (f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]" if row.get("ci_low") is not None else "-")
        lines.append(f"{row['metric']:<26} {row.get('unit', ''):<8} {num(row['a'])} {num(row['b'])} "
                     f"{num(row['diff'], 9)} {interval:>21} {prob(row.get('p_value')):>7} "
                     f"{prob(row.get('p_wilcoxon')):>7}  {row.get('verdict') or verdict(row)}")
    lines.append(f"p (t): {PAIRED_TEST_NOTE}")
    return "\n".join(lines)


PAIRED_TEST_NOTE = ("paired t-test on the pairs both runs scored (significant when p < alpha); p (W): Wilcoxon "
                    "signed-rank test; FID/KID: interval overlap only")
