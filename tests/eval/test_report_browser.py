"""The HTML report renders in headless Chromium (skipped when Debian's chromium is absent)."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np
import pytest
from PIL import Image

from appleswap.eval.report_html import render_html


def _report(faces_dir) -> dict:
    rows = [{"id": f"p{i}", "source": str(faces_dir / "obama.jpg"), "target": str(faces_dir / "biden2.jpg"),
             "swap": str(faces_dir / "obama1.jpg"), "id_sim/x": 0.1 * i, "pose": float(i)} for i in range(3)]
    metrics = {"id_sim/x": {"mean": 0.1, "ci_low": 0.0, "ci_high": 0.2, "n": 3, "missing": 0},
               "pose": {"mean": 1.0, "ci_low": 0.0, "ci_high": 2.0, "n": 3, "missing": 0},
               "fid": {"mean": None, "note": "not computed: no Inception weights"}}
    return {"pairs": 3, "swaps_found": 3, "device": "cpu", "created": "now", "per_pair": rows, "metrics": metrics,
            "networks": {"identity/x": "dlib ResNet descriptor (embedded fallback)"}}


def test_worst_pairs_come_first(faces_dir):
    page = render_html(_report(faces_dir))
    grid = page[page.index("class=grid"):page.index("All pairs")]
    assert grid.index("<b>p0</b>") < grid.index("<b>p1</b>") < grid.index("<b>p2</b>")  # lowest ID sim first
    assert "(fallback)" in page and "<script>" in page and "src='http" not in page


@pytest.mark.browser
def test_report_renders_in_chromium(tmp_path, faces_dir):
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip("chromium not installed")
    (tmp_path / "report.html").write_text(render_html(_report(faces_dir)))
    shot = tmp_path / "shot.png"
    subprocess.run([browser, "--headless", "--no-sandbox", "--disable-gpu", f"--screenshot={shot}",
                    "--window-size=1000,900", (tmp_path / "report.html").as_uri()], check=True, timeout=60,
                   capture_output=True)
    pixels = np.asarray(Image.open(shot).convert("L"))
    assert pixels.shape == (900, 1000) and pixels.std() > 10  # text, tables and thumbnails, not a blank page
