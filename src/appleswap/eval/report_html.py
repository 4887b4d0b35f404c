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
    "id_top1": "source retrieved first among all sources (% in the page, fraction in the JSON)",
    "id_top5": "source among the 5 nearest (% in the page, fraction in the JSON)",
    "pose": "L2 of yaw/pitch/roll difference to the target, degrees",
    "expression": "L2 of expression coefficients to the target",
    "gaze": "angle between swap and target gaze, degrees",
    "skin": "CIEDE2000 of mean skin colour vs target",
    "lighting": "RMS of low-frequency L* vs target",
    "fid": "Frechet Inception distance to the reference set",
    "kid": "kernel Inception distance to the reference set",
}
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


def _fmt(value, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if percent else f"{value:.3f}"


def _metric_rows(report: dict) -> str:
    rows = []
    for name, entry in report["metrics"].items():
        base = name.split("/")[0]
        percent = base in ("id_top1", "id_top5")
        interval = (f"[{_fmt(entry.get('ci_low'), percent)}, {_fmt(entry.get('ci_high'), percent)}]"
                    if entry.get("ci_low") is not None else "-")
        note = entry.get("note") or entry.get("what") or DESCRIPTIONS.get(base, "")
        counts = f"{entry.get('n', '-')}" + (f" ({entry['missing']} missing)" if entry.get("missing") else "")
        arrow = "&darr;" if base in LOWER_IS_BETTER else "&uarr;"
        rows.append(f"<tr><td class=l>{html.escape(name)} {arrow}</td><td>{_fmt(entry.get('mean'), percent)}</td>"
                    f"<td>{interval}</td><td>{counts}</td><td class=l>{html.escape(note)}</td></tr>")
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
<h2>Metrics</h2><table><thead><tr><th class=l>metric</th><th>mean</th><th>95% CI</th><th>n</th>
<th class=l>what</th></tr></thead><tbody>{_metric_rows(report)}</tbody></table>
<h2>Models used</h2><ul>{networks}</ul>
<h2>Worst pairs first{f' (by {html.escape(primary)})' if primary else ''}</h2>{_grid(report, primary, grid, columns)}
<h2>All pairs</h2><p class=small>Click a column header to sort.</p>{_pair_table(report, columns)}
</body></html>"""
