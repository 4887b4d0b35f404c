"""Provenance labels in every format and the invisible watermark (survives JPEG quality 90, keyed)."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from appleswap.app.provenance import (
    LABEL,
    provenance_record,
    read_image_provenance,
    read_video_provenance,
    save_labelled_image,
    video_tags,
)
from appleswap.app.video import write_video
from appleswap.app.watermark import DEFAULT_KEY, combine_scores, detect_watermark, embed_watermark
from appleswap.files import load_image


@pytest.fixture(scope="module")
def photo(faces_dir):
    return load_image(faces_dir / "two_people.jpg")


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


def test_watermark_survives_jpeg90_and_is_keyed(photo):
    marked = embed_watermark(photo)
    psnr = 10 * np.log10(255**2 / np.mean((marked.astype(float) - photo) ** 2))
    assert psnr > 40, "watermark must be invisible"
    assert not detect_watermark(photo).detected
    assert abs(detect_watermark(photo).score) < 4
    recoded = _jpeg(marked, 90)
    assert detect_watermark(recoded).detected
    assert not detect_watermark(recoded, key=DEFAULT_KEY + 1).detected
    assert detect_watermark(_jpeg(marked, 75)).detected


def test_watermark_rejects_bad_input():
    with pytest.raises(ValueError, match="uint8 RGB"):
        embed_watermark(np.zeros((32, 32), np.uint8))
    with pytest.raises(ValueError, match="too small"):
        detect_watermark(np.zeros((4, 4, 3), np.uint8))


def test_combine_scores():
    assert combine_scores([]) == 0.0
    assert combine_scores([10.0, 8.0, 12.0, 10.0]) == pytest.approx(10.0)


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
