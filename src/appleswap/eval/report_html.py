"""Self-contained HTML report: metric table with intervals, sortable per-pair rows, worst-first image grid.

No CDN, no external files: thumbnails are inline JPEG data URIs and the sorting script is a few lines of inline
JavaScript, so the page can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import logging
from pathlib import Path

import numpy as np
from PIL import Image

from appleswap.files import load_image

log = logging.getLogger(__name__)

LOWER_IS_BETTER = ("pose", "expression", "gaze", "skin", "lighting", "fid", "kid")
DESCRIPTIONS = {
    "id_sim": "cosine to the paired source (higher is better)",
    "id_top1": "source retrieved first among all sources, % of pairs (higher is better)",
    "id_top5": "source among the 5 nearest, % of pairs (higher is better)",
    "pose": "L2 of yaw/pitch/roll difference to the target, degrees",
    "expression": "L2 of expression coefficients to the target",
    "gaze": "angle between swap and target gaze, degrees",
    "skin": "CIEDE2000 of mean skin colour vs target",
    "lighting": "RMS of low-frequency L* vs target",
    "fid": "Frechet Inception distance to the reference set",
    "kid": "kernel Inception distance to the reference set",
}
UNITS = {"id_sim": "cosine", "id_top1": "%", "id_top5": "%", "pose": "degrees", "expression": "L2",
         "gaze": "degrees", "skin": "dE2000", "lighting": "L* RMS", "fid": "FID", "kid": "KID"}
MISSING_SWAP_RULE = ("a missing swap, or one without a detectable face, counts as a failure: ID similarity 0 and a "
                     "retrieval miss (both included in the means); pose, expression, gaze, skin and lighting cannot "
                     "score it and leave it out (their n says how many pairs were scored)")


def unit_of(metric: str) -> str:
    """The one unit a metric is reported in (JSON, terminal and page alike)."""
    return UNITS.get(metric.split("/")[0], "")


STYLE = """body{font-family:system-ui,sans-serif;margin:24px;color:#222}table{border-collapse:collapse;margin:12px 0}
td,th{border:1px solid #ccc;padding:4px 8px;text-align:right}th{background:#f0f0f0;cursor:pointer}
td.l,th.l{text-align:left}.grid{display:grid;grid-template-columns:repeat(auto-fill,minmax(420px,1fr));gap:12px}
.card{border:1px solid #ddd;padding:6px}.card img{width:128px;height:128px;margin-right:4px}.fb{color:#a60}
.small{font-size:12px;color:#555}"""
SORT_JS = """function sortTable(t,c){var b=t.tBodies[0],r=Array.from(b.rows),a=t.dataset.col==c&&t.dataset.dir!='d';
r.sort(function(x,y){var p=parseFloat(x.cells[c].dataset.v),q=parseFloat(y.cells[c].dataset.v);
if(isNaN(p))p=a?Infinity:-Infinity;if(isNaN(q))q=a?Infinity:-Infinity;return a?q-p:p-q;});
r.forEach(function(e){b.appendChild(e)});t.dataset.col=c;t.dataset.dir=a?'d':'a';}"""


def _thumb(path: str | None, size: int = 128) -> str:
    if not path or not Path(path).is_file():
        return ""
    try:
        image = Image.fromarray(load_image(path)).resize((size, size), Image.BICUBIC)
    except ValueError as error:
        log.warning("thumbnail skipped: %s", error)
        return ""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.3f}"


def _metric_rows(report: dict) -> str:
    rows = []
    for name, entry in report["metrics"].items():
        base = name.split("/")[0]
        interval = (f"[{_fmt(entry.get('ci_low'))}, {_fmt(entry.get('ci_high'))}]"
                    if entry.get("ci_low") is not None else "-")
        note = entry.get("note") or entry.get("what") or DESCRIPTIONS.get(base, "")
        counts = f"{entry.get('n', '-')}" + (f" ({entry['missing']} missing)" if entry.get("missing") else "")
        arrow = "&darr;" if base in LOWER_IS_BETTER else "&uarr;"
        if entry.get("failures"):
            counts += f" ({entry['failures']} failures)"
        unit = html.escape(entry.get("unit") or unit_of(name))
        rows.append(f"<tr><td class=l>{html.escape(name)} {arrow}</td><td class=l>{unit}</td>"
                    f"<td>{_fmt(entry.get('mean'))}</td><td>{interval}</td><td>{counts}</td>"
                    f"<td class=l>{html.escape(note)}</td></tr>")
    return "\n".join(rows)


def _pair_table(report: dict, columns: list[str]) -> str:
    head = "".join(f"<th onclick='sortTable(this.closest(\"table\"),{i + 1})'>{html.escape(c)}</th>"
                   for i, c in enumerate(columns))
    body = []
    for row in report["per_pair"]:
        cells = "".join(f"<td data-v='{row.get(c) if row.get(c) is not None else 'NaN'}'>{_fmt(row.get(c))}</td>"
                        for c in columns)
        body.append(f"<tr><td class=l data-v='NaN'>{html.escape(row['id'])}</td>{cells}</tr>")
    return (f"<table id=pairs><thead><tr><th class=l>id</th>{head}</tr></thead><tbody>{''.join(body)}</tbody>"
            "</table>")


def _worst_first(report: dict, key: str | None) -> list[dict]:
    rows = report["per_pair"]
    if key is None:
        return rows
    sign = 1.0 if key.split("/")[0] in LOWER_IS_BETTER else -1.0
    return sorted(rows, key=lambda r: -np.inf if r.get(key) is None else -sign * r[key])


def _grid(report: dict, key: str | None, count: int, columns: list[str]) -> str:
    cards = []
    for row in _worst_first(report, key)[:count]:
        images = "".join(f"<img alt='{label}' title='{label}' src='{_thumb(row.get(label))}'>"
                         for label in ("source", "target", "swap"))
        facts = " &middot; ".join(f"{html.escape(c)} {_fmt(row.get(c))}" for c in columns[:4])
        cards.append(f"<div class=card><b>{html.escape(row['id'])}</b> <span class=small>{facts}</span><br>{images}"
                     "<div class=small>source | target | swap</div></div>")
    return f"<div class=grid>{''.join(cards)}</div>"


def _excluded(report: dict) -> str:
    rows = report.get("excluded") or []
    if not rows:
        return ""
    items = "".join(f"<li>{html.escape(row['id'])}: {html.escape(row['reason'])}</li>" for row in rows)
    return f"<h2>Excluded pairs ({len(rows)})</h2><ul>{items}</ul>"


def render_html(report: dict, grid: int = 60) -> str:
    """The report page as one HTML string."""
    columns = [name for name in report["metrics"] if report["per_pair"] and name in report["per_pair"][0]]
    primary = next((c for c in columns if c.startswith("id_sim/")), columns[0] if columns else None)
    networks = "".join(f"<li>{html.escape(k)}: {html.escape(str(v))}"
                       f"{' <span class=fb>(fallback)</span>' if 'fallback' in str(v) else ''}</li>"
                       for k, v in report["networks"].items())
    return f"""<!doctype html><html><head><meta charset=utf-8><title>appleswap eval</title><style>{STYLE}</style>
<script>{SORT_JS}</script></head><body>
<h1>appleswap evaluation</h1>
<p class=small>{report['pairs']} pairs, {report['swaps_found']} swaps found, device {html.escape(report['device'])},
created {html.escape(report['created'])}. Intervals: 95% bootstrap.</p>
<h2>Metrics</h2><table><thead><tr><th class=l>metric</th><th class=l>unit</th><th>mean</th><th>95% CI</th><th>n</th>
<th class=l>what</th></tr></thead><tbody>{_metric_rows(report)}</tbody></table>
<p class=small>Missing swaps: {html.escape(report.get('missing_swaps_rule', MISSING_SWAP_RULE))}.</p>
{_excluded(report)}
<h2>Models used</h2><ul>{networks}</ul>
<h2>Worst pairs first{f' (by {html.escape(primary)})' if primary else ''}</h2>{_grid(report, primary, grid, columns)}
<h2>All pairs</h2><p class=small>Click a column header to sort.</p>{_pair_table(report, columns)}
</body></html>"""
