"""The resumable, parallel preprocessing run: photos in, a teacher-ready dataset in the reference layout out.

Resumable and idempotent: an input is finished when its manifest record exists (written last, atomically), so a
run killed at any point (even with SIGKILL) continues with the rest and redoes nothing. Every output goes
through ``files.atomic_path``, so no half-written file is ever visible.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import multiprocessing
import os
import time
from collections.abc import Iterator
from concurrent import futures
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import Any, Literal

from appleswap.config import option
from appleswap.files import EnvironmentFault, save_json
from appleswap.preprocess.layout import InputItem, discover_inputs, record_path

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    aligned: bool = option(False, "inputs are already FFHQ-aligned crops: skip detection and alignment")
    face_selector: Literal["largest", "all"] = option("largest", "which faces of a photo to keep")
    size: int = option(512, "side of the aligned crop in pixels")
    landmarks: Literal["mediapipe", "reference", "3ddfa-v3"] = option(
        "mediapipe", "landmark provider: MediaPipe mesh (embedded), the authors' drawings, or 3DDFA-V3 weights")
    reference_root: str | None = option(None, "dataset holding 3dmm/ and iris/ for --landmarks reference "
                                              "(default: INPUT)")
    parser: str | None = option(None, "BiSeNet face parser: a file, a registry name, or 'auto' (face_parser); "
                                      "default: the landmark-mesh mask")
    occlusion: str | None = option(None, "DeepLabV3+ occlusion model: a file, a registry name or 'auto' "
                                         "(occlusion_deeplabv3); the mask becomes parser AND visible")
    aesthetic: bool = option(False, "score every face with the LAION aesthetic predictor (score.json)")
    clip_dir: str | None = option(None, "CLIP ViT-L/14 folder for the aesthetic score (default: registry)")
    aesthetic_head: str | None = option(None, "LAION aesthetic MLP head file (default: registry)")
    min_aesthetic: float | None = option(None, "skip faces scoring below this (implies --aesthetic)")
    parity: bool = option(False, "do what the authors' scripts do (docs/fidelity.md): parser and occlusion "
                                 "models, 3DDFA-V3 landmarks, their segmentation quirks; conditions as the released "
                                 "teacher saw them")
    parser_double_norm: bool = option(False, "normalise the parser input twice, as the release (--parity)")
    occlusion_flip: Literal["none", "average", "only"] = option(
        "none", "occlusion views: plain, plain + mirrored, or the release's mirrored only (--parity)")
    inpainting: bool = option(False, "also write the inpainting-baseline condition (black face region)")
    preview: bool = option(False, "write preview.jpg: photo | landmarks | mask | condition per face")
    workers: int = option(1, "worker processes (0: one per CPU core)")
    min_face_score: float = option(0.5, "face detector confidence threshold")
    min_face_size: float = option(24.0, "ignore detected faces smaller than this (pixels)")
    min_side: int = option(64, "refuse images whose shorter side is below this (pixels)")
    jpeg_quality: int = option(95, "JPEG quality of the aligned crops")
    limit: int | None = option(None, "process at most this many inputs (for a quick look)")


_WORKER: Any = None


def _init_worker(config: PreprocessConfig, output_root: str, input_root: str, runtime: dict[str, Any],
                 parent_pid: int | None = None) -> None:
    global _WORKER
    if parent_pid is not None:  # a pool worker: never outlive the run (kill -9 of the parent included)
        from appleswap.workers import die_with_parent

        die_with_parent(parent_pid)
    logging.getLogger("absl").setLevel(logging.ERROR)
    from appleswap.preprocess.worker import FaceWorker

    _WORKER = FaceWorker(config, output_root, input_root, **runtime)


def _process(item: InputItem) -> dict[str, Any]:
    """Run one input in this process and write its record last (the 'finished' marker)."""
    record = _WORKER.process(item)
    save_json(record_path(_WORKER.output_root, item), record)
    return record


def pending_items(items: list[InputItem], output_root: Path) -> list[InputItem]:
    """Inputs without a manifest record."""
    return [item for item in items if not record_path(output_root, item).is_file()]


def run_preprocess(input_dir: str | Path, output_dir: str | Path, config: PreprocessConfig | None = None,
                   progress: bool = True, weights_dir: str | Path | None = None,
                   device: str | None = None) -> dict[str, Any]:
    """Preprocess every face under ``input_dir`` into ``output_dir``; returns the run summary.

    ``weights_dir`` / ``device`` are only used by the optional networks (parser, occlusion, aesthetic, 3DDFA).
    """
    from appleswap.parity import apply_parity

    config = apply_parity(config or PreprocessConfig(), "preprocess")
    input_root, output_root = Path(input_dir), Path(output_dir)
    _check_config(config, input_root, output_root)
    items = discover_inputs(input_root)
    if config.limit is not None:
        items = items[: config.limit]
    if not items:
        raise FileNotFoundError(f"no image files in {input_root} (nor in its identity sub-folders)")
    _remove_stale_temporaries(output_root)
    _warn_on_changed_config(output_root, config)
    todo = pending_items(items, output_root)
    log.info("%d inputs, %d already done, %d to do", len(items), len(items) - len(todo), len(todo))
    start = time.perf_counter()
    done = 0
    runtime = {"weights_dir": str(weights_dir) if weights_dir else None, "device": device}
    for _ in _run_items(todo, config, output_root, input_root, runtime, progress):
        done += 1
    elapsed = time.perf_counter() - start
    summary = finalize(items, output_root, config)
    summary.update({"processed_now": done, "seconds": round(elapsed, 3)})
    return summary


def _remove_stale_temporaries(output_root: Path) -> None:
    """Delete the ``.<name>.*.tmp`` files a killed run left behind (``files.atomic_path`` names them so)."""
    if not output_root.is_dir():
        return
    for path in output_root.rglob(".*.tmp"):
        if path.is_file():
            path.unlink(missing_ok=True)
            log.debug("removed stale temporary %s", path)


RUN_ONLY_FIELDS = frozenset({"workers", "preview", "limit"})  # do not change what a finished input contains


def _warn_on_changed_config(output_root: Path, config: PreprocessConfig) -> None:
    """Finished inputs are never redone; say so when this run asks for different outputs than the last one."""
    manifest = output_root / "manifest.json"
    if not manifest.is_file():
        return
    try:
        previous = json.loads(manifest.read_text()).get("config", {})
    except (OSError, ValueError):
        return
    current = dataclasses.asdict(config)
    changed = sorted(k for k in current if k not in RUN_ONLY_FIELDS and k in previous and previous[k] != current[k])
    if changed:
        log.warning("settings differ from the run that wrote %s (%s); finished inputs keep their old outputs: "
                    "delete %s to redo them", output_root, ", ".join(changed), output_root / "manifest")


def _check_config(config: PreprocessConfig, input_root: Path, output_root: Path) -> None:
    if not input_root.is_dir():
        raise FileNotFoundError(f"input folder {input_root} does not exist")
    if config.size < 64:
        raise ValueError(f"--size must be at least 64, got {config.size}")
    if config.landmarks == "reference" and not config.aligned:
        raise ValueError("--landmarks reference reads the authors' drawings of aligned crops: add --aligned")
    if output_root.resolve() == input_root.resolve() and not config.aligned:
        raise ValueError("OUTPUT must differ from INPUT unless --aligned (outputs would mix with the photos)")


def _workers(config: PreprocessConfig, count: int) -> int:
    wanted = config.workers if config.workers > 0 else (multiprocessing.cpu_count() or 1)
    return max(1, min(wanted, count))


def _run_items(items: list[InputItem], config: PreprocessConfig, output_root: Path, input_root: Path,
               runtime: dict[str, Any], progress: bool) -> Iterator[dict[str, Any]]:
    """Yield each record as it finishes; one process inline, or a spawn pool with a bounded queue."""
    from tqdm import tqdm

    if not items:
        return
    bar = tqdm(total=len(items), unit="img", disable=not progress, dynamic_ncols=True, desc="preprocess")
    workers = _workers(config, len(items))
    try:
        if workers == 1:
            _init_worker(config, str(output_root), str(input_root), runtime)
            for item in items:
                yield _tick(bar, _process(item))
            return
        context = multiprocessing.get_context("spawn")
        initargs = (config, str(output_root), str(input_root), runtime, os.getpid())
        with futures.ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                         initargs=initargs) as pool:
            try:
                queue = iter(items)
                running = {pool.submit(_process, item) for item in _take(queue, 2 * workers)}
                while running:
                    finished, running = futures.wait(running, return_when=futures.FIRST_COMPLETED)
                    running |= {pool.submit(_process, item) for item in _take(queue, len(finished))}
                    for future in finished:
                        yield _tick(bar, future.result())
            except BaseException:  # stop queued work at once; running items finish or fail on their own
                pool.shutdown(wait=True, cancel_futures=True)
                raise
    except BrokenProcessPool as error:
        raise EnvironmentFault("a preprocessing worker died (out of memory or a crash in a native library)",
                               hint="finished inputs are kept: run the same command again to resume") from error
    finally:
        bar.close()


def _take(queue: Iterator[InputItem], count: int) -> list[InputItem]:
    taken = []
    for item in queue:
        taken.append(item)
        if len(taken) >= count:
            break
    return taken


def _tick(bar: Any, record: dict[str, Any]) -> dict[str, Any]:
    bar.update(1)
    if record.get("status") == "error":
        log.warning("%s", record.get("error"))
    return record


def load_records(items: list[InputItem], output_root: Path) -> list[dict[str, Any]]:
    records = []
    for item in items:
        path = record_path(output_root, item)
        if path.is_file():
            records.append(json.loads(path.read_text()))
    return records


def finalize(items: list[InputItem], output_root: Path, config: PreprocessConfig) -> dict[str, Any]:
    """Write ``manifest.json``, ``score.json`` (when scored) and the preview from the per-input records."""
    records = load_records(items, output_root)
    save_json(output_root / "manifest.json", {"config": dataclasses.asdict(config), "records": records})
    scores = {face["key"]: {"aes": face["aes"]} for record in records for face in record["faces"]
              if face.get("aes") is not None and face.get("key")}
    if scores:
        _save_scores(output_root / "score.json", scores)
    counts: dict[str, int] = {}
    for record in records:
        counts[record["status"]] = counts.get(record["status"], 0) + 1
    faces = sum(1 for record in records for face in record["faces"] if face.get("status") == "ok")
    if config.preview:
        from appleswap.preprocess.preview import write_preview

        write_preview(output_root, records, output_root / "preview.jpg")
    failed = [record.get("error") or record["input"] for record in records if record["status"] == "error"]
    return {"inputs": len(items), "finished": len(records), "faces": faces, "status": counts, "failed": failed}


def _save_scores(path: Path, scores: dict[str, dict[str, float]]) -> None:
    """score.json as the reference writes it: natural key order, indent 4."""
    from appleswap.files import atomic_path
    from appleswap.preprocess.layout import _natural

    ordered = {key: scores[key] for key in sorted(scores, key=_natural)}
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(ordered, indent=4))
