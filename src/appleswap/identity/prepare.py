"""``prepare-ids``: PuLID ID tokens for every image of a preprocessed dataset, in a cache outside the dataset.

Cache layout (identity tree ``<id>/<name>.jpg``; flat datasets drop the ``<id>/`` level)::

    <cache>/masked/<id>/<name>.safetensors   tokens of the face-masked image (what the reference trained on;
                                             mask from <id>/mask_intersection/<name>.png when present)
    <cache>/raw/<id>/<name>.safetensors      tokens of the raw image
    <cache>/null.safetensors                 the null ID (PuLID uncond)

The authors' ``<id>/pulid_id/<name>.npy`` and ``<id>/masked_pulid_id/<name>.npy`` (and ``uncond.npy``) are
imported instead of recomputed, so released datasets work without the encoder weights. Every file is written
atomically (a killed run leaves no partial file; its leftover temporary files are removed by the next run on the
same host), finished files are skipped, and ``shard_index/num_shards`` (or torchrun's RANK/WORLD_SIZE) split the
images between processes.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from appleswap.files import commit_temporary, is_image_path, load_image, save_json
from appleswap.identity.store import FORMAT, TOKENS_KEY, load_reference_npy
from appleswap.preprocess.layout import RESERVED_FILES

log = logging.getLogger(__name__)

KINDS = ("masked", "raw")
REFERENCE_NPY_DIRS = {"raw": "pulid_id", "masked": "masked_pulid_id"}
MASK_DIR = "mask_intersection"
ARTIFACT_DIRS = frozenset({"3dmm", "iris", "iris_vis", "segmap", "mask", "segmap_intersection", MASK_DIR,
                           "pulid_id", "masked_pulid_id", "manifest"})


@dataclass(frozen=True)
class Entry:
    """One dataset image: ``rel`` is ``<id>/<name>`` (or ``<name>`` for flat datasets)."""

    rel: str
    image: Path
    folder: Path

    def mask_path(self) -> Path:
        return self.folder / MASK_DIR / f"{self.image.stem}.png"

    def reference_npy(self, kind: str) -> Path:
        return self.folder / REFERENCE_NPY_DIRS[kind] / f"{self.image.stem}.npy"


@dataclass
class PrepareStats:
    written: int = 0
    imported: int = 0
    skipped: int = 0
    failed: list[str] = field(default_factory=list)
    null: str = "skipped"


def list_dataset(root: str | Path) -> list[Entry]:
    """Images of a flat dataset (images directly in ``root``) or an identity tree (``root/<id>/*.jpg``).

    A dataset written by ``appleswap preprocess`` is listed from its manifest (the aligned face of every face
    record with status ok), so files beside the faces (``preview.jpg``, the contact sheet) are never taken for
    faces; a dataset from the authors' scripts (no manifest) by its layout, reserved names left out."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} not found")
    from_manifest = _manifest_entries(root)
    if from_manifest is not None:
        return from_manifest
    flat = sorted(p for p in root.iterdir() if p.is_file() and is_image_path(p) and p.name not in RESERVED_FILES)
    if flat:
        return [Entry(p.stem, p, root) for p in flat]
    entries = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and p.name not in ARTIFACT_DIRS):
        entries += [Entry(f"{folder.name}/{p.stem}", p, folder)
                    for p in sorted(folder.iterdir()) if p.is_file() and is_image_path(p)]
    return entries


def _manifest_records(root: Path) -> list[dict] | None:
    """``manifest.json``'s records, else the per-input records of a run still going or killed; None: no manifest."""
    manifest = root / "manifest.json"
    if manifest.is_file():
        return list(json.loads(manifest.read_text()).get("records", []))
    parts = sorted((root / "manifest").rglob("*.json")) if (root / "manifest").is_dir() else []
    return [json.loads(p.read_text()) for p in parts] or None


def _manifest_entries(root: Path) -> list[Entry] | None:
    records = _manifest_records(root)
    if records is None:
        return None
    entries = []
    for record in records:
        for face in record.get("faces", []) if record.get("status") == "ok" else []:
            image = next((o for o in face.get("outputs", []) if is_image_path(Path(o))), None)
            if face.get("status") == "ok" and image and (root / image).is_file():
                rel = Path(image).with_suffix("").as_posix()
                entries.append(Entry(rel, root / image, (root / image).parent))
    return sorted(entries, key=lambda e: e.rel)


def resolve_shard(shard_index: int | None, num_shards: int | None) -> tuple[int, int]:
    """Explicit values, else torchrun's RANK / WORLD_SIZE, else (0, 1); validated."""
    index = shard_index if shard_index is not None else int(os.environ.get("RANK", "0"))
    count = num_shards if num_shards is not None else int(os.environ.get("WORLD_SIZE", "1"))
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"--shard-index {index} must be in [0, --num-shards {count})")
    return index, count


def cache_file(cache: Path, kind: str, rel: str) -> Path:
    return cache / kind / f"{rel}.safetensors"


def _tmp_name(path: Path) -> Path:
    return path.with_name(f".{path.name}.{socket.gethostname()}.{os.getpid()}.tmp")


def write_tokens(path: Path, tokens: torch.Tensor, metadata: dict[str, str]) -> None:
    """Atomic identity-file write whose temporary name carries host and pid (see :func:`remove_stale_tmp`)."""
    from safetensors.torch import save_file

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_name(path)
    tensor = tokens.detach().to("cpu", torch.float32)
    tensor = (tensor[None] if tensor.ndim == 2 else tensor).contiguous()
    try:
        save_file({TOKENS_KEY: tensor}, str(tmp), metadata={"format": FORMAT, **metadata})
        commit_temporary(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def remove_stale_tmp(cache: Path) -> int:
    """Delete temporary files left by killed runs of THIS host (their pid is gone); other hosts' are kept."""
    host, removed = socket.gethostname(), 0
    for tmp in cache.rglob(".*.tmp"):
        parts = tmp.name.rsplit(".", 3)
        if len(parts) != 4 or parts[1] != host or not parts[2].isdigit() or _pid_alive(int(parts[2])):
            continue
        tmp.unlink(missing_ok=True)
        removed += 1
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def find_reference_uncond(root: Path) -> Path | None:
    """The authors' uncond.npy (stored under one identity folder, e.g. n000002/pulid_id/), if any."""
    for sub in ("masked_pulid_id", "pulid_id"):
        for candidate in sorted(root.glob(f"*/{sub}/uncond.npy")) + sorted(root.glob(f"{sub}/uncond.npy")):
            return candidate
    return None


def check_cache_location(dataset: Path, cache: Path) -> None:
    dataset, cache = dataset.resolve(), cache.resolve()
    if cache == dataset or dataset in cache.parents:
        raise ValueError(f"--cache {cache} is inside the dataset {dataset}; put the cache outside it "
                         "(the dataset stays read-only input)")


class _LazyEncoder:
    """Loads the encoder on first use, so importing released .npy files needs no weights."""

    def __init__(self, factory: Callable[[], object]) -> None:
        self.factory, self.encoder = factory, None

    def get(self):
        if self.encoder is None:
            self.encoder = self.factory()
        return self.encoder


def _compute(entry: Entry, kind: str, lazy: _LazyEncoder) -> tuple[torch.Tensor, dict[str, str]]:
    """Tokens of one image (masked with the dataset mask when present, else a computed face mask)."""
    from appleswap.identity.masking import load_mask

    encoder = lazy.get()
    image = load_image(entry.image)
    name = str(entry.image)
    if kind == "raw":
        feats = encoder.features([image], names=[name])
        mask_from = "none"
    elif entry.mask_path().is_file():
        feats = encoder.features([image], masks=[load_mask(entry.mask_path(), image.shape)], names=[name])
        mask_from = f"{MASK_DIR}/{entry.mask_path().name}"
    else:
        feats = encoder.features([image], masked=True, names=[name])
        mask_from = "computed"
    meta = encoder.metadata(masked=kind == "masked", mask_source=",".join(feats.mask_sources))
    meta.update({"source": entry.rel + entry.image.suffix, "face_mask": mask_from})
    return encoder.tokens_from_features(feats), meta


def _one(entry: Entry, kind: str, cache: Path, lazy: _LazyEncoder, import_npy: bool, stats: PrepareStats) -> None:
    out = cache_file(cache, kind, entry.rel)
    if out.is_file():
        stats.skipped += 1
        return
    npy = entry.reference_npy(kind)
    if import_npy and npy.is_file():
        write_tokens(out, load_reference_npy(npy), {"source": entry.rel + entry.image.suffix,
                                                    "masked": str(kind == "masked").lower(),
                                                    "imported_from": f"{REFERENCE_NPY_DIRS[kind]}/{npy.name}"})
        stats.imported += 1
        return
    try:
        tokens, meta = _compute(entry, kind, lazy)
    except ValueError as error:  # no face, unreadable photo or mask: report, keep going
        log.warning("%s (%s): %s", entry.rel, kind, error)
        stats.failed.append(f"{entry.rel} ({kind}): {error}")
        return
    write_tokens(out, tokens, meta)
    stats.written += 1


def _null(dataset: Path, cache: Path, lazy: _LazyEncoder, import_npy: bool) -> str:
    out = cache / "null.safetensors"
    if out.is_file():
        return "exists"
    reference = find_reference_uncond(dataset) if import_npy else None
    if reference is not None:
        write_tokens(out, load_reference_npy(reference), {"imported_from": str(reference.relative_to(dataset))})
        return "imported"
    encoder = lazy.get()
    write_tokens(out, encoder.null_tokens(), {**encoder.metadata(masked=False, mask_source="none"),
                                             "null_id": "idformer(zeros)"})
    return "written"


def run_prepare_ids(dataset: str | Path, cache: str | Path, encoder_factory: Callable[[], object], *,
                    kinds: tuple[str, ...] = KINDS, shard_index: int | None = None, num_shards: int | None = None,
                    import_npy: bool = True, progress: bool = True) -> PrepareStats:
    """Fill ``cache`` for this process's shard; shard 0 also writes the null ID. Re-running resumes."""
    from tqdm import tqdm

    dataset, cache = Path(dataset), Path(cache)
    bad = [k for k in kinds if k not in KINDS]
    if bad:
        raise ValueError(f"kinds: unknown {bad}; choose from {KINDS}")
    check_cache_location(dataset, cache)
    index, count = resolve_shard(shard_index, num_shards)
    entries = list_dataset(dataset)[index::count]
    cache.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_tmp(cache)
    if removed:
        log.info("removed %d temporary file(s) left by killed runs", removed)
    lazy, stats = _LazyEncoder(encoder_factory), PrepareStats()
    for entry in tqdm(entries, desc=f"prepare-ids {index + 1}/{count}", unit="img", disable=not progress):
        for kind in kinds:
            _one(entry, kind, cache, lazy, import_npy, stats)
    if index == 0:
        stats.null = _null(dataset, cache, lazy, import_npy)
    report = cache / f"failures.shard{index}-of-{count}.json"
    if stats.failed:
        save_json(report, stats.failed)  # what to look at; these images are retried on the next run
    elif report.is_file():
        report.unlink()
    return stats
