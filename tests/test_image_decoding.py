"""Photo decoding against written-out formulas: EXIF orientation direction (all 8, on an asymmetric image), alpha
composited on white, 16-bit and CMYK grey levels."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from appleswap import files

# what a viewer shows for each EXIF orientation, as numpy operations on the stored pixels (EXIF 2.3, tag 0x0112)
DISPLAY = {
    1: lambda a: a,
    2: lambda a: a[:, ::-1],  # mirrored left-right
    3: lambda a: a[::-1, ::-1],  # rotated 180
    4: lambda a: a[::-1],  # mirrored top-bottom
    5: lambda a: a.transpose(1, 0, 2),  # transposed (mirror + 90)
    6: lambda a: np.rot90(a, -1),  # stored rotated: turn 90 clockwise to view
    7: lambda a: a[::-1, ::-1].transpose(1, 0, 2),  # transverse
    8: lambda a: np.rot90(a, 1),  # turn 90 counter-clockwise to view
}


def _asymmetric(height=64, width=96):
    """No symmetry: a red block in the top-left corner, a green bar along the bottom, a blue ramp left to right."""
    image = np.zeros((height, width, 3), np.uint8)
    image[..., 2] = np.linspace(0, 255, width).astype(np.uint8)[None]
    image[:16, :24, 0] = 255
    image[-6:, :, 1] = 200
    return image


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_turns_the_photo_upright(tmp_path, orientation):
    stored = _asymmetric()
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = orientation
    image.save(tmp_path / "photo.png", exif=exif)
    loaded = files.load_image(tmp_path / "photo.png")
    np.testing.assert_array_equal(loaded, DISPLAY[orientation](stored))


def test_exif_orientation_in_a_jpeg(tmp_path):
    stored = _asymmetric(128, 192)
    image = Image.fromarray(stored)
    exif = image.getexif()
    exif[0x0112] = 6
    image.save(tmp_path / "photo.jpg", exif=exif, quality=95)
    loaded = files.load_image(tmp_path / "photo.jpg").astype(int)
    assert loaded.shape == (192, 128, 3)
    assert np.abs(loaded - np.rot90(stored, -1)).mean() < 4
    assert loaded[:24, -16:, 0].mean() > 200  # the red corner is now top-right


def test_partial_alpha_is_composited_on_white(tmp_path):
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (70, 80, 3)).astype(np.uint8)
    alpha = np.tile(np.linspace(0, 255, 80).round().astype(np.uint8), (70, 1))
    Image.fromarray(np.dstack([rgb, alpha]), "RGBA").save(tmp_path / "rgba.png")
    loaded = files.load_image(tmp_path / "rgba.png").astype(np.float64)
    a = alpha[..., None] / 255.0
    expected = rgb * a + 255.0 * (1 - a)
    assert np.abs(loaded - expected).max() <= 1.0
    assert (loaded[:, 0] == 255).all()  # transparent is white
    np.testing.assert_array_equal(loaded[:, -1], rgb[:, -1])  # opaque is the colour


def test_grey_with_alpha_and_transparent_palette(tmp_path):
    grey = np.full((64, 64), 100, np.uint8)
    alpha = np.full((64, 64), 64, np.uint8)
    Image.fromarray(np.dstack([grey, alpha]), "LA").save(tmp_path / "la.png")
    assert np.abs(files.load_image(tmp_path / "la.png").astype(float) - (100 * 64 + 255 * 191) / 255).max() <= 1
    palette = Image.new("P", (64, 64), 1)
    palette.putpalette([0, 0, 0, 10, 20, 30] + [0] * 762)
    palette.info["transparency"] = 1
    palette.save(tmp_path / "p.png", transparency=1)
    assert (files.load_image(tmp_path / "p.png") == 255).all()  # the transparent index is white


def test_16_bit_grey_levels_scale_to_8_bit(tmp_path):
    values = np.linspace(0, 65535, 64 * 64).round().astype(np.uint16).reshape(64, 64)
    Image.fromarray(values).save(tmp_path / "g16.png")
    loaded = files.load_image(tmp_path / "g16.png")
    expected = values / 65535.0 * 255.0
    assert np.abs(loaded[..., 0] - expected).max() <= 0.5 + 1e-9
    assert (loaded[..., 0] == loaded[..., 1]).all() and (loaded[..., 1] == loaded[..., 2]).all()
    assert loaded[0, 0, 0] == 0 and loaded[-1, -1, 0] == 255


def test_cmyk_grey_levels(tmp_path):
    c = np.tile(np.arange(0, 256, 4, dtype=np.uint8), (64, 1))
    k = c.T.copy()
    cmyk = np.dstack([c, np.zeros_like(c), np.zeros_like(c), k])
    Image.fromarray(cmyk, "CMYK").save(tmp_path / "cmyk.tif")
    loaded = files.load_image(tmp_path / "cmyk.tif").astype(np.float64)
    ink = (255.0 - k) / 255.0  # what is left after black ink
    np.testing.assert_allclose(loaded[..., 0], (255.0 - c) * ink, atol=1.0)  # cyan absorbs red
    np.testing.assert_allclose(loaded[..., 1], 255.0 * ink, atol=1.0)
    np.testing.assert_allclose(loaded[..., 2], 255.0 * ink, atol=1.0)
