"""Robustness table of the watermark: each edit of issue 24, detection rate on marked photos, false-positive rate
on clean pictures, PSNR.

Marked: every test photo (tests/data/faces) marked, then edited. Clean: the same photos unmarked, and pictures
derived from them (random crops, flips, 50-150% scales, noise, left/right halves of two photos glued together),
each also put through every edit. Besides the detector's own decision with appleswap's key, every clean picture is
scored against ``--keys`` random keys (one lattice search, many keys), which multiplies the null trials; the
largest null score is compared with the threshold and with the union bound it comes from.

  python benchmarks/bench_watermark.py [--faces tests/data/faces] [--derived 40] [--keys 25]
"""

from __future__ import annotations

import argparse
import io
import time
from pathlib import Path

import numpy as np
from PIL import Image

from appleswap.files import load_image
from appleswap.provenance import watermark as wm


def jpeg(a, quality):
    buffer = io.BytesIO()
    Image.fromarray(a).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def resize(a, factor, resample=Image.Resampling.BICUBIC):
    height, width = a.shape[:2]
    return np.asarray(Image.fromarray(a).resize((max(1, round(width * factor)), max(1, round(height * factor))),
                                                resample))


def crop(a, top=0.0, bottom=0.0, left=0.0, right=0.0):
    height, width = a.shape[:2]
    return np.ascontiguousarray(a[int(height * top):height - int(height * bottom),
                                  int(width * left):width - int(width * right)])


def rotate(a, degrees):
    return np.asarray(Image.fromarray(a).rotate(degrees, resample=Image.Resampling.BILINEAR))


EDITS = {
    "none": lambda a: a,
    "jpeg q50": lambda a: jpeg(a, 50),
    "resize 50%": lambda a: resize(a, 0.5),
    "resize 200%": lambda a: resize(a, 2.0),
    "crop 10% top": lambda a: crop(a, top=0.1),
    "crop 10% left": lambda a: crop(a, left=0.1),
    "crop 10% bottom": lambda a: crop(a, bottom=0.1),
    "crop 10% right": lambda a: crop(a, right=0.1),
    "rotate +5 deg": lambda a: rotate(a, 5),
    "rotate -5 deg": lambda a: rotate(a, -5),
    "flip horizontal": lambda a: np.ascontiguousarray(a[:, ::-1]),
    "screenshot (75% bilinear, crop, png->jpeg 85)": lambda a: jpeg(
        crop(resize(a, 0.75, Image.Resampling.BILINEAR), top=0.03, left=0.02), 85),
    "brightness +20%": lambda a: np.clip(a.astype(float) * 1.2, 0, 255).astype(np.uint8),
    "brightness -20%": lambda a: (a.astype(float) * 0.8).astype(np.uint8),
    "resize 50% + jpeg q50": lambda a: jpeg(resize(a, 0.5), 50),
}


def derived_clean(photos, count, rng):
    """Clean pictures made from the photos: crops, flips, scales, noise, two photos glued."""
    out = []
    for index in range(count):
        a = photos[index % len(photos)]
        kind = index % 5
        if kind == 0:
            h, w = a.shape[:2]
            size = int(rng.integers(300, min(h, w) + 1))
            top, left = int(rng.integers(0, h - size + 1)), int(rng.integers(0, w - size + 1))
            b = a[top:top + size, left:left + size]
        elif kind == 1:
            b = a[::-1] if rng.random() < 0.5 else a[:, ::-1]
        elif kind == 2:
            b = resize(a, float(rng.uniform(0.5, 1.5)))
        elif kind == 3:
            b = np.clip(a + rng.normal(0, rng.uniform(2, 8), a.shape), 0, 255).astype(np.uint8)
        else:
            other = photos[(index + 1) % len(photos)]
            height = min(a.shape[0], other.shape[0])
            b = np.concatenate([a[:height, : a.shape[1] // 2], other[:height, other.shape[1] // 2:]], axis=1)
        out.append(np.ascontiguousarray(b))
    return out


def psnr(a, b):
    error = np.mean((a.astype(float) - b) ** 2)
    return 10 * np.log10(255**2 / error) if error > 0 else float("inf")


def worst_window_psnr(a, b, size=256):
    values = [psnr(a[t:t + size, l:l + size], b[t:t + size, l:l + size])
              for t in range(0, a.shape[0] - size + 1, size // 2) for l in range(0, a.shape[1] - size + 1, size // 2)]
    return min(values)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--faces", type=Path, default=Path(__file__).resolve().parents[1] / "tests" / "data" / "faces")
    parser.add_argument("--derived", type=int, default=40, help="derived clean pictures")
    parser.add_argument("--keys", type=int, default=25, help="random keys scored per clean picture (null trials)")
    args = parser.parse_args()
    rng = np.random.default_rng(0)
    photos = [load_image(p) for p in sorted(args.faces.glob("*.jpg"))]
    marked = [wm.embed_watermark(p) for p in photos]
    print(f"{len(photos)} photos; threshold z > {wm.DETECT_THRESHOLD:.2f} "
          f"(union bound: P(false alarm) <= {wm.FALSE_ALARM_BOUND:g} per picture over {wm.SEARCH_TESTS} tests)")
    print(f"PSNR whole picture: min {min(psnr(m, p) for m, p in zip(marked, photos)):.1f} dB; worst 256 px window "
          f"(face regions included): min {min(worst_window_psnr(m, p) for m, p in zip(marked, photos)):.1f} dB")
    clean = photos + derived_clean(photos, args.derived, rng)
    null_keys = [int(k) for k in rng.integers(1, 2**31, size=args.keys)]
    header = (f"{'edit':48s} {'detected':>9s} {'min z':>6s} {'mean z':>6s} | {'clean FP':>9s} {'max z':>6s} | "
              f"{'null trials':>11s} {'FP':>6s} {'max z':>6s} | {'s/detect':>8s}")
    print(header)
    print("-" * len(header))
    totals = {"fp": 0, "clean": 0, "null": 0, "null_fp": 0, "null_max": -np.inf}
    for name, edit in EDITS.items():
        start = time.perf_counter()
        scores = [wm.detect_watermark(edit(m)).score for m in marked]
        per_detect = (time.perf_counter() - start) / len(marked)
        clean_scores, null_scores = [], []
        for picture in clean:
            search = wm.search_lattices([edit(picture)])
            clean_scores.append(search.score().score)
            null_scores += [search.score(key).score for key in null_keys]
        clean_scores, null_scores = np.array(clean_scores), np.array(null_scores)
        hits = sum(s > wm.DETECT_THRESHOLD for s in scores)
        fp, null_fp = int((clean_scores > wm.DETECT_THRESHOLD).sum()), int((null_scores > wm.DETECT_THRESHOLD).sum())
        totals["fp"] += fp
        totals["clean"] += len(clean_scores)
        totals["null"] += len(null_scores)
        totals["null_fp"] += null_fp
        totals["null_max"] = max(totals["null_max"], null_scores.max())
        print(f"{name:48s} {hits:>4d}/{len(scores):<4d} {min(scores):6.1f} {np.mean(scores):6.1f} | "
              f"{fp:>4d}/{len(clean_scores):<4d} {clean_scores.max():6.2f} | {len(null_scores):>11d} "
              f"{null_fp / len(null_scores):6.4f} {null_scores.max():6.2f} | {per_detect:8.2f}")
    print("-" * len(header))
    print(f"clean pictures x edits: {totals['fp']} false positives in {totals['clean']}; null trials (clean x edits x "
          f"random keys): {totals['null_fp']} in {totals['null']} (rate {totals['null_fp'] / totals['null']:.2e}), "
          f"largest null z {totals['null_max']:.2f} vs threshold {wm.DETECT_THRESHOLD:.2f}")


if __name__ == "__main__":
    main()
