"""Provenance labels in every format and the invisible watermark (survives the edits of issue 24, keyed)."""

from __future__ import annotations

import io
import math

import numpy as np
import pytest
from PIL import Image

from appleswap.app.video import write_video
from appleswap.files import load_image
from appleswap.provenance.labels import (
    LABEL,
    provenance_record,
    read_image_provenance,
    read_video_provenance,
    save_labelled_image,
    video_tags,
)
from appleswap.provenance.watermark import (
    DEFAULT_KEY,
    DETECT_THRESHOLD,
    FALSE_ALARM_BOUND,
    SEARCH_TESTS,
    detect_watermark,
    detect_watermark_frames,
    embed_watermark,
)


@pytest.fixture(scope="module")
def photo(faces_dir):
    return load_image(faces_dir / "two_people.jpg")


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def _resize(image: np.ndarray, factor: float) -> np.ndarray:
    height, width = image.shape[:2]
    return np.asarray(Image.fromarray(image).resize((round(width * factor), round(height * factor)),
                                                    Image.Resampling.BICUBIC))


def _crop(image: np.ndarray, side: str, fraction: float = 0.10) -> np.ndarray:
    height, width = image.shape[:2]
    rows, cols = int(height * fraction), int(width * fraction)
    return {"top": image[rows:], "bottom": image[:height - rows], "left": image[:, cols:],
            "right": image[:, :width - cols]}[side]


def _rotate(image: np.ndarray, degrees: float) -> np.ndarray:
    return np.asarray(Image.fromarray(image).rotate(degrees, resample=Image.Resampling.BILINEAR))


# the goal list of issue 24: each edit of a marked photo must keep the mark
EDITS = {
    "jpeg q50": lambda a: _jpeg(a, 50),
    "resize 50%": lambda a: _resize(a, 0.5),
    "resize 200%": lambda a: _resize(a, 2.0),
    "crop 10% top": lambda a: _crop(a, "top"),
    "crop 10% left": lambda a: _crop(a, "left"),
    "crop 10% bottom+right": lambda a: _crop(_crop(a, "bottom"), "right"),
    "rotate +5": lambda a: _rotate(a, 5),
    "rotate -5": lambda a: _rotate(a, -5),
    "flip": lambda a: np.ascontiguousarray(a[:, ::-1]),
    "screenshot 80% + jpeg 85": lambda a: _jpeg(_resize(a, 0.8), 85),
    "brightness +20%": lambda a: np.clip(a.astype(float) * 1.2, 0, 255).astype(np.uint8),
    "brightness -20%": lambda a: (a.astype(float) * 0.8).astype(np.uint8),
}


@pytest.fixture(scope="module")
def marked(photo):
    return embed_watermark(photo)


def test_watermark_is_invisible_and_unmarked_photos_are_clean(photo, marked, faces_dir):
    for top in range(0, photo.shape[0] - 255, 128):  # PSNR of the worst 256 px window (faces included)
        for left in range(0, photo.shape[1] - 255, 128):
            window = (slice(top, top + 256), slice(left, left + 256))
            error = np.mean((marked[window].astype(float) - photo[window]) ** 2)
            assert 10 * np.log10(255**2 / error) >= 40, (top, left)
    change = marked.astype(int) - photo
    unclipped = ((photo > 15) & (photo < 240)).all(axis=2)
    assert (change.max(axis=2) == change.min(axis=2))[unclipped].all(), "luminance only: the same on R, G, B"
    for name in ("two_people.jpg", "obama1.jpg"):
        clean = load_image(faces_dir / name)
        for variant in (clean, clean[:, ::-1]):
            result = detect_watermark(np.ascontiguousarray(variant))
            assert not result.detected and result.score < DETECT_THRESHOLD, name


@pytest.mark.parametrize("edit", list(EDITS))
def test_watermark_survives_edit(marked, edit):
    result = detect_watermark(EDITS[edit](marked))
    assert result.detected, f"{edit}: z {result.score:.1f}"


def test_lattice_is_measured_to_a_tenth_of_a_pixel(photo, marked):
    # the tile is 64 px per 1024 px of the longer side; halving the picture halves it
    expected = 64 * max(photo.shape[:2]) / 1024 * 0.5
    result = detect_watermark(_resize(marked, 0.5))
    assert result.period == pytest.approx(expected, abs=0.1)
    assert min(abs(result.angle - a) for a in (-180, -90, 0, 90, 180)) < 0.2


def test_watermark_is_keyed(marked):
    assert detect_watermark(marked).detected
    assert not detect_watermark(marked, key=DEFAULT_KEY + 1).detected


def test_threshold_follows_from_the_union_bound():
    # P(max z > tau) <= tests * exp(-tau^2 / 2) must equal the advertised bound at the threshold
    assert SEARCH_TESTS * math.exp(-DETECT_THRESHOLD**2 / 2) == pytest.approx(FALSE_ALARM_BOUND)
    assert 6.0 < DETECT_THRESHOLD < 7.0


def test_video_frames_are_combined(photo):
    marked = embed_watermark(photo[:256, :384], strength=0.5).astype(float)
    rng = np.random.default_rng(0)  # sensor noise differs from frame to frame, the mark does not
    frames = [np.clip(marked + rng.normal(0, 6, marked.shape), 0, 255).astype(np.uint8) for _ in range(4)]
    single = detect_watermark(frames[0])
    combined = detect_watermark_frames(frames)
    assert combined.score > single.score


def test_watermark_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        embed_watermark(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        detect_watermark(np.zeros((20, 20, 3), np.uint8))
    with pytest.raises(ValueError, match="no frames"):
        detect_watermark_frames([])


@pytest.mark.parametrize("ext", ["png", "jpg", "webp"])
def test_labels_in_every_image_format(tmp_path, photo, ext):
    record = provenance_record("appleswap-student", watermarked=True, source="a.jpg")
    path = save_labelled_image(tmp_path / f"out.{ext}", photo[:128, :128], record)
    assert read_image_provenance(path) == record
    with Image.open(path) as image:
        if ext == "png":
            assert image.text["Description"] == LABEL
            assert "compositeWithTrainedAlgorithmicMedia" in image.text["XML:com.adobe.xmp"]
        else:
            assert b"compositeWithTrainedAlgorithmicMedia" in image.info["xmp"]
            assert image.getexif()[0x0131].startswith("appleswap")


def test_unlabelled_image_has_no_record(tmp_path, photo):
    Image.fromarray(photo[:64, :64]).save(tmp_path / "plain.png")
    assert read_image_provenance(tmp_path / "plain.png") is None


def test_unknown_extension_is_refused(tmp_path, photo):
    with pytest.raises(ValueError, match="unsupported image extension"):
        save_labelled_image(tmp_path / "out.gif", photo, provenance_record("m", watermarked=False))


def test_video_tags_round_trip(tmp_path):
    import av

    frames = [np.full((64, 64, 3), 100, np.uint8)] * 3
    path = write_video(tmp_path / "v.mp4", frames, 10)
    assert read_video_provenance(path) is None
    record = provenance_record("appleswap-student", watermarked=False)
    tagged = tmp_path / "tagged.mp4"
    with av.open(str(path)) as src, av.open(str(tagged), "w", format="mp4",
                                            options={"movflags": "use_metadata_tags"}) as out:
        out.metadata.update(video_tags(record))
        stream = out.add_stream_from_template(src.streams.video[0])
        for packet in src.demux(src.streams.video[0]):
            if packet.dts is not None:
                packet.stream = stream
                out.mux(packet)
    assert read_video_provenance(tagged) == record
