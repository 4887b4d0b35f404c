"""``appleswap eval compare A.json B.json``: which metric differences between two runs are significant.

Per-pair metrics are compared on the pairs both reports scored (paired bootstrap interval of the mean
difference B - A plus a sign-flip permutation p-value). Set metrics (FID, KID) have no pairing; they are marked
significant only when their bootstrap intervals do not overlap.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from appleswap.eval.report_html import LOWER_IS_BETTER
from appleswap.eval.stats import paired_difference


def load_report(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"report {path} does not exist")
    report = json.loads(path.read_text())
    if "metrics" not in report or "per_pair" not in report:
        raise ValueError(f"{path} is not an appleswap eval report (no 'metrics' / 'per_pair')")
    return report


def compare_reports(a: dict, b: dict, *, resamples: int = 2000) -> list[dict]:
    """One row per metric present in both reports: difference, interval, p-value, significant, better."""
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
            result = paired_difference(values_a, values_b, resamples=resamples)
            result["test"] = "paired bootstrap + sign-flip"
        else:
            result = _set_difference(a["metrics"][name], b["metrics"][name])
        if result["diff"] is not None:
            result["better"] = "B" if (result["diff"] < 0) == lower and result["diff"] != 0 else "A"
        results.append({"metric": name, "a": a["metrics"][name].get("mean"), "b": b["metrics"][name].get("mean"),
                        **result})
    return results


def _set_difference(entry_a: dict, entry_b: dict) -> dict:
    if entry_a.get("mean") is None or entry_b.get("mean") is None:
        return {"diff": None, "ci_low": None, "ci_high": None, "p_value": None, "n": 0, "significant": False,
                "test": "not computed"}
    significant = False
    if None not in (entry_a.get("ci_low"), entry_b.get("ci_low")):
        significant = entry_a["ci_high"] < entry_b["ci_low"] or entry_b["ci_high"] < entry_a["ci_low"]
    return {"diff": entry_b["mean"] - entry_a["mean"], "ci_low": None, "ci_high": None, "p_value": None,
            "n": entry_b.get("n", 0), "significant": bool(significant), "test": "interval overlap (unpaired)"}


def format_comparison(results: list[dict], name_a: str = "A", name_b: str = "B") -> str:
    """Plain-text table for the terminal."""
    lines = [f"{'metric':<26} {name_a[:12]:>12} {name_b[:12]:>12} {'B-A':>9} {'95% CI':>21} {'p':>7}  verdict"]
    for row in results:
        def num(value, width=12):
            return f"{value:>{width}.4f}" if isinstance(value, (int, float)) else f"{'-':>{width}}"

        interval = (f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]" if row.get("ci_low") is not None else "-")
        p_value = f"{row['p_value']:.4f}" if row.get("p_value") is not None else "-"
        verdict = f"significant, {row.get('better')} better" if row["significant"] else "not significant"
        lines.append(f"{row['metric']:<26} {num(row['a'])} {num(row['b'])} {num(row['diff'], 9)} {interval:>21} "
                     f"{p_value:>7}  {verdict}")
    return "\n".join(lines)
