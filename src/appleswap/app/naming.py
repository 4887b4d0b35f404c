"""Output names: roop/Deep-Live-Cam's ``<source>-<target><ext>`` and FaceFusion-style placeholders.

Placeholders: ``{source}`` / ``{source_name}`` (first source's stem, or the identity file's), ``{target}`` /
``{target_name}`` (target stem), ``{ext}`` / ``{target_extension}`` (the output's extension with its dot:
the target's for photos, ``.mp4`` for videos), ``{index}`` (position of the target in the batch, from 0).
"""

from __future__ import annotations

import string
from pathlib import Path

_FIELDS = {"source", "source_name", "target", "target_name", "ext", "target_extension", "index"}


def check_pattern(pattern: str) -> str:
    """Reject unknown placeholders and separators early, naming them."""
    try:
        fields = {name for _, name, _, _ in string.Formatter().parse(pattern) if name is not None}
    except ValueError as error:
        raise ValueError(f"--output-pattern {pattern!r}: {error}") from error
    unknown = fields - _FIELDS
    if unknown:
        raise ValueError(f"--output-pattern {pattern!r}: unknown placeholder(s) {sorted(unknown)}; "
                         f"allowed: {sorted(_FIELDS)}")
    if "/" in pattern or "\\" in pattern:
        raise ValueError(f"--output-pattern {pattern!r}: must be a file name, not a path")
    return pattern


def output_name(pattern: str, source: str | Path, target: str | Path, index: int = 0, *, video: bool = False) -> str:
    """The file name for one (source, target) pair."""
    target = Path(target)
    ext = ".mp4" if video else (target.suffix.lower() or ".png")
    if ext in (".bmp", ".tif", ".tiff"):
        ext = ".png"  # formats without a provenance carrier
    source_stem, target_stem = Path(source).stem, target.stem
    name = check_pattern(pattern).format(source=source_stem, source_name=source_stem, target=target_stem,
                                         target_name=target_stem, ext=ext, target_extension=ext, index=index)
    if not Path(name).suffix:
        name += ext
    return name
