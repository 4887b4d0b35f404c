"""Resumable per-image feature cache, so re-scoring a new swap folder only computes the swaps.

A feature is stored as one small safetensors file per (metric, image) keyed by the image's absolute path, mtime,
size and the metric's version string (plus any other files it depends on, e.g. the target whose mask covers a
swap). Changing a metric's preprocessing means bumping its version; stale entries are then simply not found.
"""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

from appleswap.files import save_tensors

log = logging.getLogger(__name__)


def file_stamp(path: str | Path) -> str:
    """Absolute path + mtime (ns) + size: changes whenever the file is rewritten."""
    path = Path(path).resolve()
    stat = path.stat()
    return f"{path}|{stat.st_mtime_ns}|{stat.st_size}"


class FeatureCache:
    """``get``/``put`` feature dicts at ``root/<metric>/<key[:2]>/<key>.safetensors``; ``root=None`` disables it."""

    def __init__(self, root: str | Path | None) -> None:
        self.root = Path(root) if root else None
        self.hits = 0
        self.misses = 0

    @staticmethod
    def key(metric: str, version: str, paths: list[str | Path]) -> str:
        text = "\n".join([f"{metric}@{version}"] + [file_stamp(p) for p in paths])
        return hashlib.sha1(text.encode()).hexdigest()

    def _file(self, metric: str, key: str) -> Path:
        assert self.root is not None
        return self.root / metric / key[:2] / f"{key}.safetensors"

    def get(self, metric: str, key: str) -> dict[str, np.ndarray] | None:
        if self.root is None:
            return None
        path = self._file(metric, key)
        if not path.is_file():
            self.misses += 1
            return None
        from safetensors.numpy import load_file

        try:
            data = load_file(str(path))
        except (OSError, ValueError, RuntimeError) as error:  # a damaged entry is recomputed, never fatal
            log.warning("ignoring unreadable cache entry %s (%s)", path, error)
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, metric: str, key: str, features: dict[str, np.ndarray]) -> None:
        if self.root is None:
            return
        import torch

        tensors = {name: torch.from_numpy(np.ascontiguousarray(value)) for name, value in features.items()}
        save_tensors(self._file(metric, key), tensors)

    def size(self) -> int:
        if self.root is None or not self.root.is_dir():
            return 0
        return sum(len(files) for _, _, files in os.walk(self.root))
