"""Preprocessing speed per stage on real photos, one process (images/s wall and per CPU-second).

    .venv/bin/python benchmarks/bench_preprocess.py [--photos DIR] [--repeat 3] [--end-to-end]

"aligned path" = landmarks + iris + mask + condition on an aligned 512 crop (the work per face of a dataset that
is already aligned, as VGGFace2-HQ is); the goal is >= 10 crops/s per core with the embedded MediaPipe models.
"""

from __future__ import annotations

import argparse
import io
import logging
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


class Timer:
    """Accumulates wall and process-CPU seconds per stage."""

    def __init__(self) -> None:
        self.wall: dict[str, float] = {}
        self.cpu: dict[str, float] = {}
        self.count: dict[str, int] = {}

    def run(self, stage: str, fn, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn(*args, **kwargs)
        self.wall[stage] = self.wall.get(stage, 0.0) + time.perf_counter() - wall
        self.cpu[stage] = self.cpu.get(stage, 0.0) + time.process_time() - cpu
        self.count[stage] = self.count.get(stage, 0) + 1
        return result

    def table(self, groups: dict[str, tuple[str, ...]]) -> str:
        lines = [f"{'stage':<34}{'n':>5}{'ms/img':>10}{'img/s':>9}{'img/s/core':>12}", "-" * 70]
        rows = [(stage, (stage,)) for stage in self.wall] + list(groups.items())
        for name, stages in rows:
            n = self.count[stages[0]]
            wall = sum(self.wall[s] for s in stages) / n
            cpu = sum(self.cpu[s] for s in stages) / n
            lines.append(f"{name:<34}{n:>5}{wall * 1e3:>10.1f}{1 / wall:>9.1f}{1 / max(cpu, 1e-9):>12.1f}")
        return "\n".join(lines)


def _encode(array: np.ndarray, fmt: str) -> int:
    """Encode in memory as the runner writes: PNG at zlib level 1, JPEG at quality 95."""
    from PIL import Image

    buffer = io.BytesIO()
    options = {"compress_level": 1} if fmt == "PNG" else {"quality": 95}
    Image.fromarray(array).save(buffer, format=fmt, **options)
    return buffer.tell()


def _encode_outputs(crop, classes, lm_canvas, iris_canvas, condition) -> int:
    """The runner's files per face: the JPEG crop, the condition PNG and six drawings/maps."""
    from appleswap.faces.segmap import colorize, face_mask
    from appleswap.preprocess.condition import canvas_to_rgb

    mask = face_mask(classes).astype(np.uint8) * 255
    drawings = (canvas_to_rgb(lm_canvas, (0, 255, 0)), canvas_to_rgb(iris_canvas, (255, 0, 0)), colorize(classes),
                mask, colorize(classes), mask)
    return _encode(crop, "JPEG") + _encode(condition, "PNG") + sum(_encode(d, "PNG") for d in drawings)


def _draw(shape, marks):
    from appleswap.preprocess.condition import draw_iris, draw_landmarks

    return draw_landmarks(shape, marks.lm68), draw_iris(shape, marks.iris)


def bench_stages(photos: list[Path], repeat: int) -> Timer:
    from appleswap.faces.align import align_face, invert_matrix
    from appleswap.faces.detect import detect_faces
    from appleswap.faces.landmarks import get_landmark_provider
    from appleswap.faces.mesh_mask import mesh_classes
    from appleswap.files import load_image
    from appleswap.preprocess.condition import build_condition

    landmarker = get_landmark_provider("mediapipe")
    timer = Timer()
    for _ in range(repeat):
        for path in photos:
            image = timer.run("decode photo", load_image, path)
            faces = timer.run("detect (BlazeFace full range)", detect_faces, image)
            if not faces:
                continue
            rough = timer.run("align (rough, 5 keypoints)", align_face, image, faces[0].keypoints)
            found = landmarker(rough.image).transformed(invert_matrix(rough.matrix))
            crop = timer.run("align (final, 68 points)", align_face, image, found.lm68).image
            marks = timer.run("landmarks + iris (mesh on 512)", landmarker, crop)
            classes = timer.run("mask (mesh classes)", mesh_classes, marks.mesh, crop.shape)
            lm = timer.run("draw landmarks + iris", _draw, crop.shape, marks)
            condition = timer.run("condition (8x8 Lanczos + compose)", build_condition, crop, classes, *lm)
            timer.run("encode outputs (JPEG + 7 PNGs)", _encode_outputs, crop, classes, *lm, condition)
    return timer


def bench_end_to_end(photos: list[Path], repeat: int) -> tuple[int, float, float]:
    """The real runner (one worker) on copies of the photos: (faces, wall s, cpu s)."""
    import shutil

    from appleswap.preprocess.runner import PreprocessConfig, run_preprocess

    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "in"
        src.mkdir()
        for r in range(repeat):
            for path in photos:
                shutil.copy(path, src / f"{path.stem}_{r}{path.suffix}")
        wall, cpu = time.perf_counter(), time.process_time()
        summary = run_preprocess(src, Path(tmp) / "out", PreprocessConfig(), progress=False)
        return summary["faces"], time.perf_counter() - wall, time.process_time() - cpu


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--photos", default=str(REPO.parent / "shared" / "testdata" / "faces"))
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--end-to-end", action="store_true", help="also time the whole runner (with file writes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    photos = sorted(p for p in Path(args.photos).iterdir() if p.suffix.lower() in (".jpg", ".jpeg", ".png"))
    if not photos:
        print(f"no photos in {args.photos}", file=sys.stderr)
        return 2
    timer = bench_stages(photos, args.repeat)
    aligned = ("landmarks + iris (mesh on 512)", "mask (mesh classes)", "draw landmarks + iris",
               "condition (8x8 Lanczos + compose)")
    print(f"{len(photos)} photos x {args.repeat}, one process")
    print(timer.table({"= aligned path (goal >= 10/s/core)": aligned,
                       "= aligned path + encoding": aligned + ("encode outputs (JPEG + 7 PNGs)",)}))
    if args.end_to_end:
        faces, wall, cpu = bench_end_to_end(photos, args.repeat)
        print(f"\nend to end (runner, 1 worker, photos -> files): {faces} faces in {wall:.2f} s = "
              f"{faces / wall:.1f} faces/s wall, {faces / max(cpu, 1e-9):.1f} faces/CPU-s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
