"""Face tracks across video frames (IoU, then identity) and keypoint smoothing against jitter.

Why: a video swap must replace the same person in every frame (``one``/``reference`` pick a track, not a
per-frame face), and per-frame detections wobble by a pixel or two, which makes the aligned crop and so the
generated face flicker. Keypoints are smoothed per track with an exponential moving average that resets on a
fast move (a cut or a turn), so it never lags behind real motion by more than a few pixels.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import numpy as np
from scipy.optimize import linear_sum_assignment


def box_iou(a: np.ndarray, b: np.ndarray) -> float:
    inter_w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    inter_h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = inter_w * inter_h
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return float(inter / union) if union > 0 else 0.0


@dataclasses.dataclass
class Track:
    track_id: int
    box: np.ndarray
    keypoints: np.ndarray  # smoothed (5, 2)
    embedding: np.ndarray | None = None
    missed: int = 0


class FaceTracker:
    """Assigns a stable id to each detection; ``update`` returns one id per detection, in input order."""

    def __init__(self, iou_threshold: float = 0.3, max_missed: int = 15, smoothing: float = 0.0,
                 identity_threshold: float = 0.5) -> None:
        if not 0.0 <= smoothing < 1.0:
            raise ValueError(f"--landmark-smoothing must be in [0, 1), got {smoothing}")
        self.iou_threshold = iou_threshold
        self.max_missed = max_missed
        self.smoothing = smoothing
        self.identity_threshold = identity_threshold
        self.tracks: list[Track] = []
        self.next_id = 0

    def _cost(self, detections: Sequence[Any], embeddings: np.ndarray | None) -> np.ndarray:
        cost = np.ones((len(self.tracks), len(detections)))
        for t, track in enumerate(self.tracks):
            for d, det in enumerate(detections):
                iou = box_iou(track.box, det.box)
                if iou >= self.iou_threshold:
                    cost[t, d] = 1.0 - iou
                elif embeddings is not None and track.embedding is not None:
                    dist = _cosine_distance(track.embedding, embeddings[d])
                    if dist < self.identity_threshold:  # re-found after a jump: identity decides
                        cost[t, d] = 0.5 + dist
        return cost

    def update(self, detections: Sequence[Any], embeddings: np.ndarray | None = None) -> list[int]:
        ids = [-1] * len(detections)
        if self.tracks and len(detections):
            cost = self._cost(detections, embeddings)
            rows, cols = linear_sum_assignment(cost)
            for t, d in zip(rows, cols):
                if cost[t, d] < 1.0:
                    ids[d] = self._refresh(self.tracks[t], detections[d], embeddings, d)
        matched = set(ids)
        for track in self.tracks:
            if track.track_id not in matched:
                track.missed += 1
        self.tracks = [t for t in self.tracks if t.missed <= self.max_missed]
        for d, det in enumerate(detections):
            if ids[d] < 0:
                emb = None if embeddings is None else np.asarray(embeddings[d], dtype=np.float64)
                track = Track(self.next_id, np.asarray(det.box, float), np.asarray(det.keypoints, float), emb)
                self.tracks.append(track)
                ids[d] = self.next_id
                self.next_id += 1
        return ids

    def _refresh(self, track: Track, det: Any, embeddings: np.ndarray | None, d: int) -> int:
        keypoints = np.asarray(det.keypoints, dtype=np.float64)
        scale = max(float(det.box[2] - det.box[0]), 1.0)
        moved = float(np.abs(keypoints - track.keypoints).max()) / scale
        alpha = self.smoothing if moved < 0.1 else 0.0  # a big move is real motion: do not lag behind it
        track.keypoints = alpha * track.keypoints + (1.0 - alpha) * keypoints
        track.box = np.asarray(det.box, dtype=np.float64)
        track.missed = 0
        if embeddings is not None:
            new = np.asarray(embeddings[d], dtype=np.float64)
            track.embedding = new if track.embedding is None else 0.9 * track.embedding + 0.1 * new
        return track.track_id

    def keypoints(self, track_id: int) -> np.ndarray:
        """The smoothed keypoints of a live track."""
        for track in self.tracks:
            if track.track_id == track_id:
                return track.keypoints.astype(np.float32)
        raise KeyError(f"no live track {track_id}")

    def state(self) -> dict[str, Any]:
        return {"next_id": self.next_id, "tracks": [
            {"id": t.track_id, "box": t.box.tolist(), "keypoints": t.keypoints.tolist(), "missed": t.missed,
             "embedding": None if t.embedding is None else t.embedding.tolist()} for t in self.tracks]}

    def load_state(self, state: dict[str, Any]) -> None:
        self.next_id = int(state["next_id"])
        self.tracks = [Track(t["id"], np.array(t["box"]), np.array(t["keypoints"]),
                             None if t["embedding"] is None else np.array(t["embedding"]), t["missed"])
                       for t in state["tracks"]]


def _cosine_distance(a: np.ndarray, b: np.ndarray) -> float:
    a, b = np.asarray(a, float).ravel(), np.asarray(b, float).ravel()
    return float(1.0 - a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-12))
