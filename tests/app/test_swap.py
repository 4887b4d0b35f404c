"""Photo swaps with a tiny random model: geometry only (the generated face is noise).

Ground truth (photos README + the pictures): obama_and_biden.jpg has Biden on the left, Obama right of him and,
at the bottom right, a girl whose face is half in shadow (a third face, found since the detector tiles the photo);
two_people.jpg has Obama on the left and Biden on the right.
"""

from __future__ import annotations

import numpy as np
import pytest

from appleswap.files import load_image
from tests.app.conftest import configured

PEOPLE = {  # photo -> {person: (x_min, x_max) of the face centre}
    "obama_and_biden.jpg": {"biden": (700, 1000), "obama": (1100, 1400), "girl": (1580, 1780)},
    "two_people.jpg": {"obama": (200, 460), "biden": (750, 1000)},
}


def _changed_people(photo: str, before: np.ndarray, after: np.ndarray) -> set[str]:
    """Who was swapped: the people whose face box region changed."""
    diff = np.abs(after.astype(int) - before.astype(int)).sum(axis=2) > 0
    cols = np.flatnonzero(diff.any(axis=0))
    found = set()
    for person, (x0, x1) in PEOPLE[photo].items():
        if ((cols >= x0) & (cols <= x1)).sum() > 20:
            found.add(person)
    return found


@pytest.fixture(scope="module")
def photos(faces_dir):
    return {name: load_image(faces_dir / name) for name in PEOPLE}


def test_nothing_outside_the_mask_changes(engine, identity, photos):
    target = photos["two_people.jpg"]
    outcome = configured(engine, face_selector="many").swap_image(identity, target, "two_people.jpg")
    assert len(outcome.swapped) == 2
    outside = outcome.mask == 0
    assert outside.mean() > 0.8
    assert np.array_equal(outcome.image[outside], target[outside])
    inside = outcome.mask > 0.99
    assert np.abs(outcome.image[inside].astype(int) - target[inside]).mean() > 5  # the face was replaced


@pytest.mark.parametrize("photo, selector, order, position, expected", [
    ("two_people.jpg", "one", "left-right", 0, {"obama"}),
    ("two_people.jpg", "one", "left-right", 1, {"biden"}),
    ("two_people.jpg", "one", "right-left", 0, {"biden"}),
    ("obama_and_biden.jpg", "one", "left-right", 0, {"biden"}),
    ("obama_and_biden.jpg", "one", "right-left", 0, {"girl"}),
    ("obama_and_biden.jpg", "one", "right-left", 1, {"obama"}),
    ("obama_and_biden.jpg", "one", "large-small", 0, {"biden"}),  # Biden's face box is the larger one
    ("obama_and_biden.jpg", "many", "large-small", 0, {"biden", "obama", "girl"}),
])
def test_selector_lands_on_the_right_person(engine, identity, photos, photo, selector, order, position, expected):
    swapper = configured(engine, face_selector=selector, face_selector_order=order, face_position=position)
    outcome = swapper.swap_image(identity, photos[photo], photo)
    assert _changed_people(photo, photos[photo], outcome.image) == expected


@pytest.mark.parametrize("photo, person", [("two_people.jpg", "obama"), ("obama_and_biden.jpg", "obama")])
def test_reference_selector(engine, identity, photos, tmp_path, photo, person):
    """The reference is the person's face cut from another shot of the scene (a real ArcFace graph, tiny)."""
    from PIL import Image

    from appleswap.app.selection import cosine_distance

    image = photos[photo]
    x0, x1 = PEOPLE[photo][person]
    margin = (x1 - x0) // 4  # wide enough for the whole face, too narrow to reach the other person
    ref = image[:, max(0, x0 - margin): x1 + margin]
    Image.fromarray(ref).resize((ref.shape[1] * 3 // 4, ref.shape[0] * 3 // 4)).save(tmp_path / "ref.png")
    probe = configured(engine, face_selector="many")
    probe.set_reference(tmp_path / "ref.png")
    faces = probe.swapper.detect(image)
    distances = cosine_distance(probe.swapper.embed(image, [f.keypoints for f in faces]), probe.swapper.reference)
    centres = [(f.box[0] + f.box[2]) / 2 for f in faces]
    mine = [d for d, c in zip(distances, centres) if x0 <= c <= x1]
    other = [d for d, c in zip(distances, centres) if not x0 <= c <= x1]
    assert len(mine) == 1 and mine[0] < min(other)
    threshold = float((mine[0] + min(other)) / 2)
    swapper = configured(engine, face_selector="reference", reference_face_distance=threshold)
    swapper.set_reference(tmp_path / "ref.png")
    outcome = swapper.swap_image(identity, image, photo)
    assert _changed_people(photo, image, outcome.image) == {person}


def test_bad_inputs_are_clear_errors(engine, identity, tmp_path, faces_dir):
    from PIL import Image

    blank = np.full((256, 256, 3), 200, np.uint8)
    with pytest.raises(ValueError, match="no face found in the target"):
        engine.swap_image(identity, blank, "blank.png")
    Image.fromarray(blank).save(tmp_path / "blank.png")
    with pytest.raises(ValueError, match="blank.png"):
        engine.source_identity([tmp_path / "blank.png"])
    with pytest.raises(ValueError, match="min-face-size"):
        configured(engine, min_face_size=2000).swap_image(identity, load_image(faces_dir / "obama.jpg"), "obama.jpg")
    with pytest.raises(ValueError, match="cannot be mixed"):
        engine.source_identity([tmp_path / "a.safetensors", faces_dir / "obama.jpg"])


def test_image_and_id_guidance_together(engine, identity, faces_dir):
    """Both extra guidances at once (the extension of issue 3: one batched pass) change the swapped face."""
    target = load_image(faces_dir / "biden2.jpg")
    plain = engine.swap_image(identity, target, "biden2.jpg")
    guided = configured(engine, id_guidance_scale=2.0, image_guidance_scale=1.5).swap_image(identity, target,
                                                                                              "biden2.jpg")
    inside = plain.mask > 0.99
    assert inside.any()
    assert np.abs(guided.image[inside].astype(int) - plain.image[inside]).mean() > 1
