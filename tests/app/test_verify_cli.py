"""`appleswap verify`: finds label and watermark (also after JPEG quality 90), exit codes for each case."""

from __future__ import annotations

import json

from PIL import Image

from appleswap.cli import main
from appleswap.files import load_image
from appleswap.provenance.labels import provenance_record, save_labelled_image
from appleswap.provenance.watermark import embed_watermark


def test_verify_statuses(tmp_path, faces_dir, capsys):
    photo = load_image(faces_dir / "obama1.jpg")
    marked = tmp_path / "marked.jpg"
    save_labelled_image(marked, embed_watermark(photo), provenance_record("appleswap-student", watermarked=True))
    # re-encode at quality 90 without metadata: only the watermark is left
    stripped = tmp_path / "stripped.jpg"
    Image.open(marked).convert("RGB").save(stripped, format="JPEG", quality=90)
    plain = tmp_path / "plain.png"
    Image.fromarray(photo).save(plain)

    assert main(["verify", str(marked), str(stripped), "--json"]) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert lines[0]["provenance"]["model"] == "appleswap-student" and lines[0]["watermark_detected"]
    assert lines[1]["provenance"] is None and lines[1]["watermark_detected"] and lines[1]["ai_generated"]

    assert main(["verify", str(plain)]) == 1
    assert "no watermark" in capsys.readouterr().out
    assert main(["verify", str(stripped), "--watermark-key", "12345"]) == 1
    capsys.readouterr()
    assert main(["verify", str(tmp_path / "missing.jpg")]) == 2
    assert "missing.jpg" in capsys.readouterr().out
