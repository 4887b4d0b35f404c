"""``appleswap verify FILE...``: is this image or video labelled / signed / watermarked as made by appleswap?

Three independent checks per file: the metadata label (EXIF/XMP/PNG text/MP4 tags), the C2PA content credentials
(signature valid, manifest and picture bytes unchanged since signing, which signer; a local self-signed key is
reported as untrusted but intact), and the invisible watermark (found after resizing, cropping, rotation, flips
and re-encoding, with a false-alarm rate below 1e-4 per file).

Exit status: 0 when every file is recognised as appleswap's (label, valid credentials or watermark), 1 when one
is not or carries credentials that fail validation (a changed file), 2 when a file cannot be read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from pathlib import Path
from typing import Any

from appleswap.cli_common import HelpFormatter

EPILOG = """examples:
  appleswap verify swapped.jpg
  appleswap verify out/*.png clip.mp4 --json
"""


@dataclasses.dataclass
class Verdict:
    path: str
    provenance: dict[str, Any] | None
    watermark_score: float
    watermark_detected: bool
    frames_checked: int = 1
    c2pa: dict[str, Any] | None = None  # credentials.C2paReport as a dict

    @property
    def c2pa_valid(self) -> bool:
        return bool(self.c2pa and self.c2pa.get("valid"))

    @property
    def tampered(self) -> bool:
        return bool(self.c2pa and self.c2pa.get("present") and not self.c2pa.get("valid"))

    @property
    def ai_generated(self) -> bool:
        return (self.watermark_detected or bool(self.provenance and self.provenance.get("ai_generated"))
                or bool(self.c2pa_valid and self.c2pa.get("ai_generated")))


def verify_file(path: str | Path, key: int | None = None, max_frames: int = 16) -> Verdict:
    """Read the provenance record and test for the watermark (videos: up to ``max_frames`` frames combined)."""
    from appleswap.app.video import is_video_path, iter_frames, probe_video
    from appleswap.files import load_image
    from appleswap.provenance import watermark
    from appleswap.provenance.credentials import c2pa_json, read_c2pa
    from appleswap.provenance.labels import read_image_provenance, read_video_provenance

    path = Path(path)
    key = watermark.DEFAULT_KEY if key is None else key
    if is_video_path(path):
        info = probe_video(path)
        step = max(1, info.frame_count // max_frames)
        frames = [frame for i, frame in enumerate(iter_frames(path)) if i % step == 0][:max_frames]
        result = watermark.detect_watermark_frames(frames, key)
        return Verdict(str(path), read_video_provenance(path), result.score, result.detected, len(frames),
                       c2pa_json(read_c2pa(path)))
    image = load_image(path, min_side=8)
    try:
        result = watermark.detect_watermark(image, key)
    except ValueError:  # too small to carry a findable mark: the label and credentials still count
        result = watermark.WatermarkResult(False, 0.0, watermark.DETECT_THRESHOLD)
    return Verdict(str(path), read_image_provenance(path), result.score, result.detected,
                   c2pa=c2pa_json(read_c2pa(path)))


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "verify", help="check a file for appleswap's AI-generated label and invisible watermark",
        description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    parser.add_argument("files", nargs="+", metavar="FILE", help="images or videos to check")
    parser.add_argument("--watermark-key", type=int, default=None,
                        help="the key the outputs were marked with (default: appleswap's public key)")
    parser.add_argument("--json", action="store_true", help="print one JSON object per file")
    parser.add_argument("--log-level", default="warning", choices=["debug", "info", "warning", "error"])
    parser.set_defaults(func=run)


def _describe(verdict: Verdict) -> str:
    from appleswap.provenance.credentials import C2paReport, describe_c2pa

    label = "labelled AI-generated" if verdict.provenance else "no provenance label"
    if verdict.provenance:
        label += f" (tool {verdict.provenance.get('tool', '?')} {verdict.provenance.get('version', '')}, " \
                 f"model {verdict.provenance.get('model', '?')})"
    credentials = describe_c2pa(C2paReport(**verdict.c2pa)) if verdict.c2pa else "no C2PA credentials"
    mark = "watermark FOUND" if verdict.watermark_detected else "no watermark"
    return f"{verdict.path}: {label}; {credentials}; {mark} (score {verdict.watermark_score:.1f})"


def run(args: argparse.Namespace) -> int:
    status = 0
    for name in args.files:
        try:
            verdict = verify_file(name, args.watermark_key)
        except (FileNotFoundError, ValueError) as error:
            print(f"{name}: error: {error}")
            status = 2
            continue
        if args.json:
            print(json.dumps({**dataclasses.asdict(verdict), "ai_generated": verdict.ai_generated,
                              "c2pa_valid": verdict.c2pa_valid, "tampered": verdict.tampered}, sort_keys=True))
        else:
            print(_describe(verdict))
        if (verdict.tampered or not verdict.ai_generated) and status == 0:
            status = 1
    return status
