"""Face tracks across video frames (IoU, then identity), keypoint smoothing against jitter, and the per-shot
video swap that uses them.

Why: a video swap must replace the same person in every frame (``one``/``reference`` pick a track, not a
per-frame face), and per-frame detections wobble by a pixel or two, which makes the aligned crop and so the
generated face flicker. Keypoints are smoothed per track with an exponential moving average that resets on a
fast move (a cut or a turn), so it never lags behind real motion by more than a few pixels.
"""

from __future__ import annotations

import contextlib
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

    def reset(self) -> None:
        """Forget every track (a scene cut): ids keep counting, so an old id never names a new face."""
        self.tracks = []

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


@dataclasses.dataclass
class VideoSummary:
    """What a video swap did, for the user's report line and the exit status."""

    frames: int = 0
    frames_swapped: int = 0
    faces_swapped: int = 0
    frames_with_faces: int = 0
    faces_seen: int = 0
    shots: int = 0
    shots_without_person: int = 0  # shots where the chosen person (one/reference) was never found

    def line(self) -> str:
        text = (f"swapped {self.faces_swapped} faces in {self.frames_swapped} of {self.frames} frames "
                f"({self.shots} shot{'s' if self.shots != 1 else ''}")
        if self.shots_without_person:
            text += f"; the selected person is absent from {self.shots_without_person}"
        return text + ")"


class VideoSwapProcessor:
    """Per-frame swap of a video, shot by shot: the right people in every frame, keypoints smoothed per track.

    Why shots: after a scene cut the faces are other detections in other places, so tracks restart there.
    Which faces: ``many`` swaps every face of every frame; ``reference`` every face close to the reference
    embedding; ``one`` picks its face by the selector order on the first frame with faces, remembers that
    person's embedding (when an ArcFace embedder is loaded) and, after a cut or a lost track, takes the face
    nearest to it (within ``--reference-face-distance``); without an embedder the order rule picks again.
    ``finish`` raises the photo path's errors when the whole video had no face, or none was selected.
    """

    def __init__(self, swapper: Any, identity: Any, mark: Any, name: str = "target", *, lock: Any = None,
                 on_frame: Any = None, total: int = 0) -> None:
        """``lock``: held around each model call (the web UI's engines share their models across threads);
        ``on_frame(done, total)``: called after every frame (progress; it may raise to cancel)."""
        self.swapper, self.identity, self.mark, self.name = swapper, identity, mark, name
        self.lock = lock if lock is not None else contextlib.nullcontext()
        self.on_frame, self.total, self.frames_done = on_frame, total, 0
        self.config = swapper.config
        self.tracker = FaceTracker(smoothing=self.config.landmark_smoothing)
        self.targets: set[int] = set()  # track ids to swap in the current shot
        self.person: np.ndarray | None = None  # embedding of the face ``one`` chose
        self.found_in_shot = False
        self.signature: np.ndarray | None = None
        self.summary = VideoSummary()

    @property
    def frames_swapped(self) -> int:
        return self.summary.frames_swapped

    def __call__(self, frame: np.ndarray, index: int) -> np.ndarray:
        frame = self._swap(frame, index)
        self.frames_done += 1
        if self.on_frame is not None:
            self.on_frame(self.frames_done, self.total)
        return frame

    def _swap(self, frame: np.ndarray, index: int) -> np.ndarray:
        from appleswap.app.video import frame_signature, is_scene_cut

        signature = frame_signature(frame)
        if is_scene_cut(self.signature, signature):
            self._new_shot()
        self.signature = signature
        swapper, cfg = self.swapper, self.config
        faces = swapper.detect(frame)
        self.summary.frames += 1
        self.summary.faces_seen += len(faces)
        self.summary.frames_with_faces += bool(faces)
        embeddings = None
        if faces and swapper.embed is not None and (cfg.face_selector == "reference" or self._looking_for_person(faces)):
            embeddings = swapper.embed(frame, [f.keypoints for f in faces])
        ids = self.tracker.update(faces, embeddings)
        chosen = self._choose(frame, faces, ids, embeddings)
        if chosen:
            self.found_in_shot = True
        if not chosen:
            return self.mark(frame)
        keypoints = [self.tracker.keypoints(ids[i]) for i in chosen]
        seed = cfg.seed if cfg.shared_noise else cfg.seed + index
        with self.lock:
            outcome = swapper.swap_frame(frame, self.identity, faces=faces, chosen=chosen, keypoints=keypoints,
                                         seed=seed)
        self.summary.frames_swapped += 1
        self.summary.faces_swapped += len(chosen)
        return self.mark(outcome.image)

    def _new_shot(self) -> None:
        if self.summary.shots and not self.found_in_shot and self.config.face_selector != "many":
            self.summary.shots_without_person += 1
        self.summary.shots += 1
        self.tracker.reset()
        self.targets = set()
        self.found_in_shot = False

    def _looking_for_person(self, faces: Sequence[Any]) -> bool:
        """``one`` needs embeddings when it has no live target among these faces (to choose or to re-find)."""
        live = {t.track_id for t in self.tracker.tracks if t.missed == 0}
        return self.config.face_selector == "one" and not (self.targets & live)

    def _choose(self, frame: np.ndarray, faces: list[Any], ids: list[int], embeddings: np.ndarray | None) -> list[int]:
        if not faces:
            return []
        mode = self.config.face_selector
        if mode == "many":
            return self.swapper.choose(frame, faces)
        if mode == "reference":
            self.targets |= {ids[i] for i in self.swapper.choose(frame, faces)}  # a chosen track stays chosen
            return [i for i, track in enumerate(ids) if track in self.targets]
        current = [i for i, track in enumerate(ids) if track in self.targets]
        if current:
            return current[:1]
        if self.person is None and any(t.track_id in self.targets for t in self.tracker.tracks):
            return []  # no embedder: the chosen face is only missed for now; do not jump to someone else
        pick = self._refind(faces, embeddings) if self.person is not None else self._first_pick(frame, faces)
        if pick is None:
            return []
        if self.person is None and embeddings is not None:
            self.person = np.asarray(embeddings[pick], dtype=np.float64)
        self.targets = {ids[pick]}
        return [pick]

    def _first_pick(self, frame: np.ndarray, faces: list[Any]) -> int | None:
        chosen = self.swapper.choose(frame, faces)
        return chosen[0] if chosen else None

    def _refind(self, faces: list[Any], embeddings: np.ndarray | None) -> int | None:
        """The face nearest to the chosen person (None when none is near enough, or nothing to compare)."""
        if embeddings is None:
            return None
        size = self.config.min_face_size
        usable = [i for i, f in enumerate(faces) if min(f.box[2] - f.box[0], f.box[3] - f.box[1]) >= size]
        if not usable:
            return None
        distances = [_cosine_distance(self.person, embeddings[i]) for i in usable]
        best = int(np.argmin(distances))
        return usable[best] if distances[best] < self.config.reference_face_distance else None

    def finish(self) -> None:
        """After the last frame: the photo path's errors when nothing in the whole video could be swapped."""
        if self.summary.shots and not self.found_in_shot and self.config.face_selector != "many":
            self.summary.shots_without_person += 1
            self.found_in_shot = True  # counted once, even if finish runs again
        if self.summary.faces_seen == 0:
            raise ValueError(f"{self.name}: no face found in the target")
        if self.summary.faces_swapped == 0:
            raise ValueError(f"{self.name}: face(s) found in {self.summary.frames_with_faces} frame(s) but none "
                             f"selected (--face-selector {self.config.face_selector}, "
                             f"--min-face-size {self.config.min_face_size})")

    def state(self) -> dict[str, Any]:
        return {"tracker": self.tracker.state(), "targets": sorted(self.targets),
                "person": None if self.person is None else self.person.tolist(), "found_in_shot": self.found_in_shot,
                "signature": None if self.signature is None else self.signature.tolist(),
                "summary": dataclasses.asdict(self.summary)}

    def load_state(self, state: dict[str, Any]) -> None:
        self.tracker.load_state(state["tracker"])
        self.targets = set(state["targets"])
        self.person = None if state["person"] is None else np.array(state["person"])
        self.found_in_shot = bool(state["found_in_shot"])
        self.signature = None if state["signature"] is None else np.array(state["signature"], np.float32)
        self.summary = VideoSummary(**state["summary"])
