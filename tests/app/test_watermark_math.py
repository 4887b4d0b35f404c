"""The watermark's pieces against expectations computed another way (numpy / scipy, brute force): the key tile,
its band, the embedded change (tile x perceptual gain x strength), the luminance, the whitening, the
autocorrelation, the folding of a picture onto the tile lattice and the z score of a search. Each test builds
its own inputs (no module-scoped fixtures), so a mutant of any of these functions meets every test that uses it."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from appleswap.files import load_image
from appleswap.provenance import watermark as wm

KEY = 7


def _gauss(array: np.ndarray, sigma: float) -> np.ndarray:
    """OpenCV's float Gaussian blur: radius 4 sigma, mirrored border without repeating the edge pixel."""
    return ndimage.gaussian_filter(np.asarray(array, np.float64), sigma, mode="mirror", truncate=4.0)


def _radius_grid() -> np.ndarray:
    """Radial frequency (cycles per tile) of each FFT bin of a 64 x 64 tile, from the bin index."""
    index = np.arange(64)
    folded = np.minimum(index, 64 - index)
    return np.sqrt(folded[:, None] ** 2 + folded[None, :] ** 2)


def _photo(faces_dir, rows: int = 300, cols: int = 400) -> np.ndarray:
    return load_image(faces_dir / "two_people.jpg")[:rows, :cols]


def test_key_tile_is_a_seeded_rademacher_tile():
    tile = wm.key_tile(KEY)
    assert tile.shape == (64, 64) and set(np.unique(tile)) == {-1.0, 1.0}
    assert abs(tile.mean()) < 0.05  # about as many +1 as -1
    assert np.array_equal(tile, wm.key_tile(KEY)) and not np.array_equal(tile, wm.key_tile(KEY + 1))


def test_pattern_tile_is_the_key_tile_inside_the_band_at_unit_rms():
    key_spectrum, spectrum = np.fft.fft2(wm.key_tile(KEY)), np.fft.fft2(wm.pattern_tile(KEY))
    radius = _radius_grid()
    inside = (radius >= 4.5) & (radius <= 14.0)
    assert inside.sum() > 400 and not inside[0, 0]
    np.testing.assert_allclose(np.abs(spectrum[~inside]), 0.0, atol=1e-9)
    ratio = spectrum[inside] / key_spectrum[inside]  # one real gain on every bin of the band
    np.testing.assert_allclose(ratio, ratio[0].real, rtol=1e-9)
    pattern = wm.pattern_tile(KEY)
    assert pattern.std() == pytest.approx(1.0) and abs(pattern.mean()) < 1e-12


def test_luminance_weights_and_input_checks():
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [10, 20, 30]]], np.uint8)
    np.testing.assert_allclose(wm._luminance(pixels), [[76.245, 149.685, 29.07, 0.299 * 10 + 0.587 * 20 + 3.42]],
                               rtol=1e-6)
    for bad in (np.zeros((8, 8), np.uint8), np.zeros((8, 8, 4), np.uint8), np.zeros((8, 8, 3), np.float32)):
        with pytest.raises(ValueError, match="uint8 RGB"):
            wm._luminance(bad)


def _gain_by_hand(luma: np.ndarray, scale: float) -> np.ndarray:
    detail = luma - _gauss(luma, 1.5 * scale)
    local = np.sqrt(_gauss(detail**2, 6.0 * scale))
    return np.clip(local / (np.median(local) + 1e-3), 0.5, 1.4)


def test_activity_gain_is_half_on_flat_and_capped_on_busy_areas():
    rng = np.random.default_rng(0)
    luma = np.full((96, 160), 100.0, np.float32)
    luma[:, 64:] += rng.normal(0, 20, (96, 96)).astype(np.float32)  # busy on the right
    luma[:, 112:] += rng.normal(0, 60, (96, 48)).astype(np.float32)  # busier still
    gain = wm._activity_gain(luma, 1.0)
    np.testing.assert_allclose(gain, _gain_by_hand(luma, 1.0), atol=2e-3)
    assert np.all(gain[:, :30] == 0.5) and np.all(gain[:, 130:] == pytest.approx(1.4))
    np.testing.assert_allclose(wm._activity_gain(luma, 1.5), _gain_by_hand(luma, 1.5), atol=2e-3)


def test_delta_is_the_tiled_pattern_times_gain_and_strength(faces_dir):
    photo = _photo(faces_dir)
    luma = photo.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    tile = wm.pattern_tile(KEY)
    rows, cols = np.indices(luma.shape)
    expected = 2.5 * _gain_by_hand(luma, 1.0) * tile[rows % 64, cols % 64]
    np.testing.assert_allclose(wm.watermark_delta(photo, KEY, 2.5), expected, atol=5e-3)
    np.testing.assert_allclose(wm.watermark_delta(photo), 1.6 * _gain_by_hand(luma, 1.0) * wm.pattern_tile(
        wm.DEFAULT_KEY)[rows % 64, cols % 64], atol=5e-3)  # the defaults: DEFAULT_KEY at strength 1.6


def test_large_pictures_carry_a_proportionally_larger_tile():
    rng = np.random.default_rng(1)
    image = rng.integers(60, 200, (200, 1536, 3), dtype=np.uint8)  # longer side 1.5 x 1024: period 96 px
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    carrier = wm.watermark_delta(image, KEY, 1.0) / _gain_by_hand(luma, 1.5)

    def corr(a, b):
        return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])

    assert corr(carrier[:, 200:1000], carrier[:, 296:1096]) > 0.99  # periodic in 96 px
    assert corr(carrier[:, 200:1000], carrier[:, 264:1064]) < 0.5  # not in 64
    # the tiled pattern resized by 1.5 with OpenCV's bicubic (Keys, a = -0.75), written out: output pixel x reads the
    # tile around (x + 0.5) / 1.5 - 0.5 (periodic, so away from the picture's first pixels the tile wraps)
    def keys(d):
        d = np.abs(d)
        return np.where(d <= 1, 1.25 * d**3 - 2.25 * d**2 + 1, np.where(d < 2, -0.75 * d**3 + 3.75 * d**2 - 6 * d + 3, 0))

    def resample(length):
        source = (np.arange(length) + 0.5) / 1.5 - 0.5
        base = np.floor(source).astype(int)
        matrix = np.zeros((length, 64))
        for k in range(-1, 3):
            np.add.at(matrix, (np.arange(length), (base + k) % 64), keys(source - base - k))
        return matrix

    expected = resample(200) @ wm.pattern_tile(KEY) @ resample(1536).T
    np.testing.assert_allclose(carrier[4:-4, 4:-4], expected[4:-4, 4:-4], atol=2e-3)


def test_embed_adds_the_rounded_delta_to_every_channel(faces_dir):
    photo = _photo(faces_dir)
    marked = wm.embed_watermark(photo, key=KEY, strength=2.5)
    delta = np.rint(wm.watermark_delta(photo, KEY, 2.5)).astype(int)
    assert np.array_equal(marked, np.clip(photo.astype(int) + delta[..., None], 0, 255).astype(np.uint8))
    assert marked.dtype == np.uint8 and np.abs(delta).max() >= 3
    default = wm.embed_watermark(photo)
    assert np.array_equal(default, np.clip(photo.astype(int) + np.rint(wm.watermark_delta(photo)).astype(int)[
        ..., None], 0, 255).astype(np.uint8))
    assert np.array_equal(wm.embed_watermark(photo, strength=0.0), photo)
    assert wm.embed_watermark(photo[:16, :40]).shape == (16, 40, 3)  # 16 px is enough
    with pytest.raises(ValueError, match=r"image 40x15 is too small for a watermark \(< 16 px\)"):
        wm.embed_watermark(photo[:15, :40])
    bright = np.full((32, 32, 3), 254, np.uint8)  # no wrap-around at white
    assert wm.embed_watermark(bright, strength=8.0).min() >= 200


def test_analysis_luma_shrinks_large_pictures_by_area():
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, (1000, 2048, 3), dtype=np.uint8)
    luma = image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
    small = wm._analysis_luma(image)
    assert small.shape == (500, 1024)
    np.testing.assert_allclose(small, luma.reshape(500, 2, 1024, 2).mean(axis=(1, 3)), atol=1e-3)
    assert wm._analysis_luma(image[:300, :400]).shape == (300, 400)
    # 1.5 x larger than the reference: each output pixel averages the 1.5 x 1.5 input pixels it covers
    odd = image[:300, :1536]

    def area(length):
        weights = np.zeros((round(length / 1.5), length))
        for out in range(weights.shape[0]):
            start, stop = 1.5 * out, 1.5 * out + 1.5
            for pixel in range(int(start), int(np.ceil(stop))):
                weights[out, pixel] = (min(stop, pixel + 1) - max(start, pixel)) / 1.5
        return weights

    expected = area(300) @ (odd.astype(np.float64) @ np.array([0.299, 0.587, 0.114])) @ area(1536).T
    np.testing.assert_allclose(wm._analysis_luma(odd), expected, atol=1e-2)
    assert wm._analysis_luma(image[:52, :52]).shape == (52, 52)
    with pytest.raises(ValueError, match="image 300x51 is too small to look for a watermark"):
        wm._analysis_luma(image[:51, :300])


def test_whitening_is_the_locally_normalised_high_pass():
    rng = np.random.default_rng(3)
    luma = (np.indices((80, 90)).sum(0) + rng.normal(0, 15, (80, 90))).astype(np.float32)
    luma[:, :20] = 50.0  # a flat strip, where the +1 keeps the residual small
    detail = luma - _gauss(luma, 2.0)
    expected = np.clip(detail / np.sqrt(_gauss(detail**2, 8.0) + 1.0), -3.0, 3.0)
    np.testing.assert_allclose(wm._whiten(luma), expected, atol=2e-3)
    spike = np.zeros((60, 60), np.float32)
    spike[30, 30] = 1000.0
    assert wm._whiten(spike).max() == pytest.approx(3.0)  # clipped


def test_autocorrelation_by_brute_force():
    rng = np.random.default_rng(4)
    residuals = [rng.normal(size=(12, 11)) + 2.0, rng.normal(size=(12, 11))]  # an odd width too
    acf = wm._autocorrelation(residuals)
    assert acf.shape == (12, 11)
    expected = np.zeros((12, 11))
    for dy in range(-6, 6):
        for dx in range(-5, 6):
            for r in residuals:
                r = r - r.mean()
                expected[6 + dy, 5 + dx] += np.sum(r * np.roll(r, (dy, dx), axis=(0, 1)))
    np.testing.assert_allclose(acf, expected / expected[6, 5], atol=1e-9)
    assert acf[6, 5] == pytest.approx(1.0)


def test_fold_sums_the_tiles_of_the_lattice():
    tile = np.random.default_rng(5).normal(size=(64, 64))
    picture = np.tile(tile, (2, 3))  # 128 x 192: 6 tiles
    np.testing.assert_allclose(wm._fold(picture, np.array([[0.0, 64.0], [64.0, 0.0]])), 6 * tile, atol=1e-4)
    # the reference grid's basis order reads the picture transposed (the orientations undo it)
    np.testing.assert_allclose(wm._fold(picture, np.array([[64.0, 0.0], [0.0, 64.0]])), 6 * tile.T, atol=1e-4)
    part = picture[:100, :150]  # not whole tiles: positions outside the picture add nothing
    want = np.zeros((64, 64))
    rows, cols = np.indices(part.shape)
    np.add.at(want, (rows % 64, cols % 64), part)
    np.testing.assert_allclose(wm._fold(part, np.array([[0.0, 64.0], [64.0, 0.0]])), want, atol=1e-4)
    doubled = np.repeat(np.repeat(picture, 2, axis=0), 2, axis=1)  # every tile 128 px: a lattice twice as large
    np.testing.assert_allclose(wm._fold(doubled, np.array([[0.0, 128.0], [128.0, 0.0]])), 6 * tile, atol=1e-4)


def test_orientations_are_the_dihedral_group_in_order():
    tile = np.arange(16.0).reshape(4, 4)
    turns = [tile, np.rot90(tile), np.rot90(tile, 2), np.rot90(tile, 3)]
    got = wm._orientations(tile)
    assert len(got) == 8
    for index, want in enumerate(turns + [t[:, ::-1] for t in turns]):
        assert np.array_equal(got[index], want), index


def _band_passed(folded: np.ndarray) -> np.ndarray:
    mask = (_radius_grid() >= 4.5) & (_radius_grid() <= 14.0)
    return np.fft.fft2(folded) * mask


def _z_by_hand(folded: np.ndarray, key: int) -> list[float]:
    """Per orientation: the best circular correlation of the oriented key tile with the band-passed folded tile,
    over every shift, divided by that tile's norm."""
    passed = np.real(np.fft.ifft2(_band_passed(folded)))
    key_tile = wm.key_tile(key)
    turns = [np.rot90(key_tile, k) for k in range(4)]
    windows = np.lib.stride_tricks.sliding_window_view(np.tile(passed, (2, 2))[:127, :127], (64, 64))
    return [float(np.einsum("ijkl,kl->ij", windows, oriented).max()) / np.linalg.norm(passed)  # every shift
            for oriented in turns + [t[:, ::-1] for t in turns]]


def test_score_is_the_best_normalised_correlation_over_shifts_and_orientations():
    rng = np.random.default_rng(6)
    planted = np.roll(np.rot90(wm.key_tile(KEY), 1)[:, ::-1], (5, 9), axis=(0, 1))  # orientation 5, shifted
    folded = rng.normal(0, 3, (64, 64)) + planted
    expected = _z_by_hand(folded, KEY)
    assert int(np.argmax(expected)) == 5
    spectrum = _band_passed(folded)
    norm = float(np.linalg.norm(np.real(np.fft.ifft2(spectrum))))
    basis = np.array([[10.0, 60.0], [-62.0, 12.0]])
    empty = wm.WatermarkSearch([np.eye(2) * 64], [np.zeros((64, 64), complex)], [0.0])
    search = wm.WatermarkSearch([*empty.bases, basis], [*empty.spectra, spectrum], [*empty.norms, norm])
    result = search.score(KEY, threshold=expected[5] - 0.01)
    assert result.score == pytest.approx(expected[5], rel=1e-9) and result.orientation == 5 and result.detected
    assert result.threshold == pytest.approx(expected[5] - 0.01)
    assert result.period == pytest.approx((math.hypot(10, 60) + math.hypot(62, 12)) / 2)
    assert result.angle == pytest.approx(math.degrees(math.atan(10 / 60)))
    assert not search.score(KEY, threshold=expected[5] + 0.01).detected
    other = search.score(KEY + 1)  # another key: its own (chance) correlation, at the default threshold
    assert other.score == pytest.approx(max(_z_by_hand(folded, KEY + 1)), rel=1e-9)
    assert other.threshold == wm.DETECT_THRESHOLD and not other.detected
    nothing = empty.score(KEY)  # a search with nothing to score finds nothing
    assert nothing.score == -np.inf and nothing.detected is False and nothing.threshold == wm.DETECT_THRESHOLD


def test_search_sums_frames_of_one_geometry_and_keeps_the_reference_grid(faces_dir):
    frame = wm.embed_watermark(_photo(faces_dir, 200, 260), key=KEY)
    one = wm.search_lattices([frame])
    two = wm.search_lattices([frame, frame, frame[:-8]])  # the odd-sized frame is left out
    assert len(one.bases) == len(two.bases) and np.array_equal(one.bases[-1], [[64, 0], [0, 64]])
    radius = _radius_grid()
    outside = (radius < 4.5) | (radius > 14.0)
    for basis_one, basis_two, spec_one, spec_two, norm_one, norm_two in zip(
            one.bases, two.bases, one.spectra, two.spectra, one.norms, two.norms):
        np.testing.assert_allclose(basis_two, basis_one)
        np.testing.assert_allclose(spec_two, 2 * spec_one, rtol=1e-6, atol=1e-6)
        assert norm_one == pytest.approx(np.linalg.norm(np.fft.ifft2(spec_one)))  # Parseval
        assert norm_two == pytest.approx(2 * norm_one)
        assert np.abs(spec_one[outside]).max() == 0.0
    assert wm.detect_watermark_frames([frame], key=KEY).score == pytest.approx(one.score(KEY).score)
    assert wm.detect_watermark(frame, key=KEY, threshold=1e9).threshold == 1e9
    assert wm.detect_watermark(frame, key=KEY).detected and not wm.detect_watermark(frame).detected
    with pytest.raises(ValueError, match="^no frames to look for a watermark in$"):
        wm.search_lattices([])
