"""Face selection orders/modes on real detections, output naming, and tracking across frames."""

from __future__ import annotations

import numpy as np
import pytest

from appleswap.app.naming import check_pattern, output_name
from appleswap.app.selection import cosine_distance, order_faces, select_faces
from appleswap.app.tracking import FaceTracker
from appleswap.faces.detect import FaceDetection, detect_faces
from appleswap.files import load_image


def _face(x0, y0, size, score=0.9):
    box = np.array([x0, y0, x0 + size, y0 + size], float)
    kps = np.array([[x0 + 0.3 * size, y0 + 0.4 * size], [x0 + 0.7 * size, y0 + 0.4 * size],
                    [x0 + 0.5 * size, y0 + 0.6 * size], [x0 + 0.35 * size, y0 + 0.8 * size],
                    [x0 + 0.65 * size, y0 + 0.8 * size]], np.float32)
    return FaceDetection(box=box, score=score, keypoints=kps)


@pytest.fixture(scope="module")
def two_people(faces_dir):
    return detect_faces(load_image(faces_dir / "two_people.jpg"))


def test_orders_on_two_people(two_people):
    # two_people.jpg: Obama on the left, Biden on the right (photos README + the picture)
    assert len(two_people) == 2
    left, right = order_faces(two_people, "left-right")
    assert two_people[left].box[0] < 400 < two_people[right].box[0]
    assert order_faces(two_people, "right-left") == [right, left]
    assert select_faces(two_people, "one", order="left-right", position=1) == [right]
    assert select_faces(two_people, "one", order="left-right", position=5) == []
    assert sorted(select_faces(two_people, "many")) == [0, 1]


def test_orders_on_synthetic_boxes():
    faces = [_face(100, 300, 50, 0.7), _face(10, 10, 200, 0.95), _face(400, 100, 120, 0.8)]
    assert order_faces(faces, "large-small") == [1, 2, 0]
    assert order_faces(faces, "small-large") == [0, 2, 1]
    assert order_faces(faces, "top-bottom") == [1, 2, 0]
    assert order_faces(faces, "bottom-top") == [0, 2, 1]
    assert order_faces(faces, "best-worst") == [1, 2, 0]
    with pytest.raises(ValueError, match="face-selector-order"):
        order_faces(faces, "random")


def test_reference_mode_uses_distance():
    faces = [_face(0, 0, 100), _face(200, 0, 100), _face(400, 0, 100)]
    embeddings = np.array([[1.0, 0, 0], [0.0, 1, 0], [0.9, 0.1, 0]])
    assert select_faces(faces, "reference", order="left-right", embeddings=embeddings,
                        reference=np.array([1.0, 0, 0]), distance=0.3) == [0, 2]
    assert select_faces(faces, "reference", embeddings=embeddings, reference=np.array([0, 0, 1.0])) == []
    assert cosine_distance(embeddings[:1], embeddings[0])[0] == pytest.approx(0.0)
    with pytest.raises(ValueError, match="reference-face"):
        select_faces(faces, "reference")


def test_output_names():
    assert output_name("{source}-{target}{ext}", "a/obama.jpg", "b/biden.JPG") == "obama-biden.jpg"
    assert output_name("{index}_{target_name}", "s.png", "clip.mov", 3, video=True) == "3_clip.mp4"
    assert output_name("{source}-{target}{ext}", "s.png", "t.bmp") == "s-t.png"
    with pytest.raises(ValueError, match="unknown placeholder"):
        check_pattern("{nope}.png")
    with pytest.raises(ValueError, match="file name"):
        check_pattern("../{target}.png")


def test_tracker_keeps_ids_and_smooths():
    tracker = FaceTracker(smoothing=0.5)
    a, b = _face(0, 0, 100), _face(300, 0, 100)
    assert tracker.update([a, b]) == [0, 1]
    # order swapped and slightly moved: the ids follow the faces
    b2, a2 = _face(302, 0, 100), _face(2, 0, 100)
    assert tracker.update([b2, a2]) == [1, 0]
    smoothed = tracker.keypoints(0)
    assert np.allclose(smoothed[0, 0], (a.keypoints[0, 0] + a2.keypoints[0, 0]) / 2)
    # a jump (cut) is followed at once, not smoothed
    far = _face(30, 0, 100)
    tracker.update([far, b2])
    assert np.allclose(tracker.keypoints(0), far.keypoints)
    state = tracker.state()
    clone = FaceTracker(smoothing=0.5)
    clone.load_state(state)
    assert clone.update([_face(600, 0, 100)]) == [2]


def test_tracker_reidentifies_by_embedding():
    tracker = FaceTracker()
    tracker.update([_face(0, 0, 100)], np.array([[1.0, 0.0]]))
    assert tracker.update([_face(500, 0, 100)], np.array([[0.99, 0.05]])) == [0]
    assert tracker.update([_face(0, 300, 100)], np.array([[0.0, 1.0]])) == [1]
