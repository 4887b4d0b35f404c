"""Where preprocessing reads its inputs and writes its outputs: the reference (VGGFace2-HQ) dataset layout.

Inputs are a folder of photos, a flat folder of aligned faces, or an identity tree ``<identity>/<name>.jpg``.
For a face named ``<name>`` in folder ``<out>/<identity>/`` (or ``<out>/`` for flat inputs) the files are::

    <name>.jpg                                              the aligned 512 crop (the training image)
    3dmm/<name>/<name>_ldm68.png                            68 landmark dots (green on black)
    iris/<name>.png                                         10 iris dots (red on black)
    segmap/, mask/, segmap_intersection/, mask_intersection/ <name>.png
    condition_blended_image_blurdownsample8_segGlass_landmark_iris/<name>.png   the teacher's condition
    condition_blended_image_mask_segGlass_landmark_iris/<name>.png              inpainting baseline (optional)

plus ``<out>/score.json``, ``<out>/manifest.json`` and one record per input in ``<out>/manifest/<key>.json``
(written last: a record means the input is finished).
"""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from appleswap.files import is_image_path
from appleswap.preprocess.condition import CONDITION_DIRS

# folders the reference scripts (and we) write next to the images; never treated as inputs
OUTPUT_DIRS = frozenset(
    {"3dmm", "iris", "iris_vis", "segmap", "mask", "segmap_intersection", "mask_intersection", "pulid_id",
     "masked_pulid_id", "manifest", *CONDITION_DIRS.values()}
)

RESERVED_FILES = frozenset({"preview.jpg"})  # written at the root of an output folder


@dataclasses.dataclass(frozen=True)
class InputItem:
    path: Path
    folder: str  # identity folder relative to the input root ("" for flat inputs)
    stem: str  # unique within its folder

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.stem}" if self.folder else self.stem


def _natural(text: str) -> list:
    return [int(part) if part.isdigit() else part.lower() for part in re.split(r"(\d+)", text)]


def discover_inputs(root: str | Path) -> list[InputItem]:
    """Image files directly in ``root`` and in its identity sub-folders (one level), in natural order."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"input folder {root} does not exist")
    items: list[InputItem] = []
    folders = [root] + sorted((d for d in root.iterdir() if d.is_dir() and not d.name.startswith(".")
                               and d.name not in OUTPUT_DIRS), key=lambda d: _natural(d.name))
    for folder in folders:
        rel = "" if folder == root else folder.name
        files = sorted((f for f in folder.iterdir() if f.is_file() and is_image_path(f)
                        and not f.name.startswith(".") and not (rel == "" and f.name in RESERVED_FILES)),
                       key=lambda f: _natural(f.name))
        seen: set[str] = set()
        for path in files:
            stem = path.stem if path.stem not in seen else f"{path.stem}_{path.suffix.lstrip('.').lower()}"
            seen.add(stem)
            items.append(InputItem(path=path, folder=rel, stem=stem))
    return items


@dataclasses.dataclass(frozen=True)
class FacePaths:
    """Every output path of one face in the reference layout."""

    root: Path
    folder: str
    name: str

    @property
    def base(self) -> Path:
        return self.root / self.folder if self.folder else self.root

    @property
    def key(self) -> str:
        return f"{self.folder}/{self.name}" if self.folder else self.name

    @property
    def image(self) -> Path:
        return self.base / f"{self.name}.jpg"

    @property
    def lm68(self) -> Path:
        return self.base / "3dmm" / self.name / f"{self.name}_ldm68.png"

    @property
    def iris(self) -> Path:
        return self.base / "iris" / f"{self.name}.png"

    def png(self, kind: str) -> Path:
        """``kind`` is segmap, mask, segmap_intersection, mask_intersection or a condition fill (blur, black)."""
        folder = CONDITION_DIRS.get(kind, kind)
        return self.base / folder / f"{self.name}.png"

    def relative(self, path: Path) -> str:
        return path.relative_to(self.root).as_posix()


def face_name(stem: str, index: int, count: int) -> str:
    """``<stem>`` for the only face of a photo, ``<stem>_<index>`` when several faces are kept."""
    return stem if count == 1 else f"{stem}_{index}"


def record_path(output_root: Path, item: InputItem) -> Path:
    return Path(output_root) / "manifest" / f"{item.key}.json"
