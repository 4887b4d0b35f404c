"""Pair lists: which swap belongs to which source and target, and where the files are.

A pair list is a CSV with columns ``id,source,target`` and optionally ``swap``. Relative paths resolve against
``--sources`` / ``--targets`` / ``--swapped``; a missing extension or a different one (FFHQ ``68000.png`` vs a
``68000.jpg`` copy) is tolerated by matching the file stem. The swap of a pair is ``swap`` when given, else
``<swapped>/<id>.*``, else ``<swapped>/<target stem>.*``. ``ffhq`` names the shipped FFHQ protocol list (targets
68000-68999, sources 69000-69999, pair ``i`` = (69000 + i -> 68000 + i), ids ``000000``-``000999``).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from importlib import resources
from pathlib import Path

from appleswap.files import IMAGE_EXTENSIONS

log = logging.getLogger(__name__)

BUILTIN_LISTS = {"ffhq": "ffhq_eval_pairs.csv"}


@dataclasses.dataclass(frozen=True)
class Pair:
    id: str
    source: Path
    target: Path
    swap: Path | None  # None when the swap file is missing (scored as a failure, not skipped silently)


def read_pair_rows(pairs: str | Path) -> list[dict[str, str]]:
    """Rows of a pair CSV, or of a shipped list named in ``BUILTIN_LISTS``."""
    if str(pairs) in BUILTIN_LISTS:
        text = (resources.files("appleswap") / "data" / BUILTIN_LISTS[str(pairs)]).read_text()
    else:
        path = Path(pairs)
        if not path.is_file():
            raise FileNotFoundError(f"--pairs: {path} does not exist (give a CSV or one of {sorted(BUILTIN_LISTS)})")
        text = path.read_text()
    reader = csv.DictReader(text.splitlines())
    missing = {"id", "source", "target"} - set(reader.fieldnames or ())
    if missing:
        raise ValueError(f"--pairs {pairs}: missing column(s) {sorted(missing)}; need id,source,target[,swap]")
    rows = [row for row in reader if row.get("id")]
    ids = [row["id"] for row in rows]
    if len(set(ids)) != len(ids):
        raise ValueError(f"--pairs {pairs}: pair ids must be unique")
    if not rows:
        raise ValueError(f"--pairs {pairs}: no pairs")
    return rows


def find_image(name: str, folder: Path | None) -> Path | None:
    """``name`` as given, under ``folder``, or any image with the same stem there."""
    candidate = Path(name)
    if not candidate.is_absolute() and folder is not None:
        candidate = folder / candidate
    if candidate.is_file():
        return candidate
    parent = candidate.parent
    stem = candidate.stem if candidate.suffix.lower() in IMAGE_EXTENSIONS else candidate.name
    for extension in IMAGE_EXTENSIONS + tuple(e.upper() for e in IMAGE_EXTENSIONS):
        option = parent / f"{stem}{extension}"
        if option.is_file():
            return option
    return None


def load_pairs(pairs: str | Path, swapped: str | Path | None, sources: str | Path | None = None,
               targets: str | Path | None = None, excluded: list[dict] | None = None) -> list[Pair]:
    """Resolve every pair to files; a missing swap is recorded (a failure of the swap method).

    A pair whose source or target is missing is excluded: appended to ``excluded`` as ``{"id", "reason"}`` when
    that list is given (else it is an error); when no pair resolves at all, FileNotFoundError names the first ones."""
    source_dir = Path(sources) if sources else None
    target_dir = Path(targets) if targets else None
    swap_dir = Path(swapped) if swapped else None
    resolved, errors = [], []
    for row in read_pair_rows(pairs):
        source = find_image(row["source"], source_dir) or find_image(row["id"], source_dir)
        target = find_image(row["target"], target_dir) or find_image(row["id"], target_dir)
        if source is None or target is None:
            missing_name = f"source {row['source']}" if source is None else f"target {row['target']}"
            errors.append(f"pair {row['id']}: {missing_name}")
            continue
        swap = None
        if row.get("swap"):
            swap = find_image(row["swap"], swap_dir)
        elif swap_dir is not None:
            swap = find_image(row["id"], swap_dir) or find_image(Path(row["target"]).stem, swap_dir)
        resolved.append(Pair(row["id"], source, target, swap))
    if errors and (excluded is None or not resolved):
        shown = "; ".join(errors[:5]) + (f" (+{len(errors) - 5} more)" if len(errors) > 5 else "")
        raise FileNotFoundError(f"--pairs {pairs}: images not found: {shown} (check --sources / --targets)")
    for error in errors:
        pair_id, reason = error.split(": ", 1)
        excluded.append({"id": pair_id.removeprefix("pair "), "reason": f"{reason} not found"})
        log.warning("%s not found; pair excluded", error)
    missing = sum(p.swap is None for p in resolved)
    if swap_dir is not None and missing:
        log.warning("%d of %d swaps missing in %s; they count as failures (ID similarity 0, retrieval miss; "
                    "not scored by the attribute metrics)", missing, len(resolved), swap_dir)
    return resolved
