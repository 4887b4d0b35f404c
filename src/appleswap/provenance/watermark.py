"""Invisible watermark that survives resizing, cropping, rotation, flips and re-encoding: a tiled keyed pattern.

Why a tiled pattern: the mark is one keyed 64 x 64 tile of band-limited noise repeated over the whole picture
(luminance only, stronger where the picture is busy). Repetition makes it its own synchronisation template: the
autocorrelation of any marked picture peaks on the tile lattice, so the detector reads the scale, rotation and
aspect of whatever resize / rotation the picture went through off those peaks, maps the picture back onto the
lattice, folds every tile onto one, and finds the remaining shift (a crop), flip or quarter turn by correlating the
folded tile with the key in all 8 orientations through the FFT. The band (about 0.07-0.22 cycles per pixel at the
reference scale) sits below what a 50% downscale or JPEG quality 50 removes and above what the eye sees best.

Why the threshold is a number and not a tuning: the key is a +-1 (Rademacher) tile ``R``; with ``F`` the folded,
band-passed picture, the score at shift ``t`` is ``z(t) = sum_v R(v) F(v + t) / ||F||``. For a picture that was
never marked, ``F`` does not depend on the key, so each ``z`` is a Rademacher sum with variance 1 and Hoeffding's
inequality gives ``P(z > tau) <= exp(-tau^2 / 2)`` whatever the picture. The detector takes the maximum over
``SEARCH_TESTS`` tests (every shift, 8 orientations, ``LATTICE_CANDIDATES`` lattice hypotheses), so by the union
bound ``P(false alarm) <= SEARCH_TESTS * exp(-tau^2 / 2)``; ``DETECT_THRESHOLD`` solves that for
``FALSE_ALARM_BOUND`` (1e-4). ``benchmarks/bench_watermark.py`` measures the rate on clean pictures.

The watermark is zero-bit ("marked by appleswap with this key"); the key is an integer seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from collections.abc import Sequence

import cv2
import numpy as np

TILE = 64  # period of the pattern in pixels at the reference scale
REFERENCE_SIDE = 1024  # pictures larger than this get a proportionally larger tile; the detector resizes to it
BAND = (4.5, 14.0)  # radial frequency band of the tile, in cycles per tile (0.07-0.22 cycles per pixel)
DEFAULT_KEY = int.from_bytes(hashlib.sha256(b"appleswap-watermark-v1").digest()[:4], "little")
DEFAULT_STRENGTH = 1.6  # RMS of the luminance change in grey levels where the picture is of median busyness
MAX_GAIN = 1.4  # busier areas get up to this factor more, flat ones down to half
VIDEO_STRENGTH = 3.0  # H.264 smooths away much of a weak mark
LATTICE_CANDIDATES = 4  # lattice hypotheses tried per picture (from the autocorrelation peaks + the unmoved grid)
ORIENTATIONS = 8  # the dihedral group: identity, 3 quarter turns, and the flipped 4
SEARCH_TESTS = TILE * TILE * ORIENTATIONS * LATTICE_CANDIDATES
FALSE_ALARM_BOUND = 1e-4  # per picture, by the union bound above
DETECT_THRESHOLD = math.sqrt(2 * math.log(SEARCH_TESTS / FALSE_ALARM_BOUND))  # about 6.5
MIN_PERIOD, MAX_PERIOD = 26.0, 170.0  # tile periods the detector looks for (50% .. 200% scale, with margin)
_LUMA = np.array([0.299, 0.587, 0.114])


@dataclasses.dataclass(frozen=True)
class WatermarkResult:
    """Detection outcome: ``score`` is the largest z over the search (under about 4.5 on unmarked pictures)."""

    detected: bool
    score: float
    threshold: float
    period: float = 0.0  # the tile period found, in pixels of the analysed picture
    angle: float = 0.0  # the lattice rotation found, degrees
    orientation: int = 0  # which of the 8 dihedral orientations matched (4..7: mirrored)


def _luminance(image: np.ndarray) -> np.ndarray:
    if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
        raise ValueError(f"expected a uint8 RGB image (H, W, 3), got {image.dtype} {image.shape}")
    return (image.astype(np.float32) @ _LUMA.astype(np.float32)).astype(np.float32)


def _band_mask() -> np.ndarray:
    freq = np.fft.fftfreq(TILE) * TILE
    radius = np.hypot(freq[:, None], freq[None, :])
    return ((radius >= BAND[0]) & (radius <= BAND[1])).astype(np.float64)


def key_tile(key: int) -> np.ndarray:
    """The key's +-1 tile (TILE x TILE)."""
    rng = np.random.default_rng(np.uint64(key))
    return (rng.integers(0, 2, size=(TILE, TILE)) * 2 - 1).astype(np.float64)


def pattern_tile(key: int) -> np.ndarray:
    """The embedded tile: the key tile band-passed (circularly), unit RMS."""
    tile = np.real(np.fft.ifft2(np.fft.fft2(key_tile(key)) * _band_mask()))
    return tile / tile.std()


def _tile_scale(shape: tuple[int, ...]) -> float:
    return max(1.0, max(shape[:2]) / REFERENCE_SIDE)


def _activity_gain(luma: np.ndarray, scale: float) -> np.ndarray:
    """Perceptual mask: up to MAX_GAIN x in busy areas, down to 0.5x in flat ones. The cap keeps every region,
    faces included, at PSNR >= 40 dB: RMS change <= strength * MAX_GAIN = 2.2 grey levels (41 dB)."""
    sigma = 1.5 * scale
    detail = luma - cv2.GaussianBlur(luma, (0, 0), sigma)
    local = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), 4 * sigma))
    return np.clip(local / (np.median(local) + 1e-3), 0.5, MAX_GAIN)


def watermark_delta(image: np.ndarray, key: int = DEFAULT_KEY, strength: float = DEFAULT_STRENGTH) -> np.ndarray:
    """The luminance change (H, W) the mark adds to ``image``, before rounding."""
    luma = _luminance(image)
    height, width = luma.shape
    scale = _tile_scale(luma.shape)
    tile = pattern_tile(key).astype(np.float32)
    reps = (math.ceil(height / (TILE * scale)) + 1, math.ceil(width / (TILE * scale)) + 1)
    tiled = np.tile(tile, reps)
    if scale > 1.0:  # a large picture carries the same pattern as its REFERENCE_SIDE version would
        tiled = cv2.resize(tiled, (round(tiled.shape[1] * scale), round(tiled.shape[0] * scale)),
                           interpolation=cv2.INTER_CUBIC)
    return strength * _activity_gain(luma, scale) * tiled[:height, :width]


def embed_watermark(image: np.ndarray, key: int = DEFAULT_KEY, strength: float = DEFAULT_STRENGTH) -> np.ndarray:
    """Return a copy of ``image`` (uint8 RGB) carrying the key's watermark (the same change on R, G and B)."""
    if min(image.shape[:2]) < 16:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is too small for a watermark (< 16 px)")
    delta = watermark_delta(image, key, strength)
    return np.clip(image.astype(np.int16) + np.rint(delta).astype(np.int16)[..., None], 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------------- detection


def _analysis_luma(image: np.ndarray) -> np.ndarray:
    """Luminance at the reference size (large pictures are shrunk, so the tile is about TILE px again)."""
    luma = _luminance(image)
    if min(luma.shape) < 2 * MIN_PERIOD:
        raise ValueError(f"image {image.shape[1]}x{image.shape[0]} is too small to look for a watermark")
    scale = _tile_scale(luma.shape)
    if scale > 1.0:
        size = (round(luma.shape[1] / scale), round(luma.shape[0] / scale))
        luma = cv2.resize(luma, size, interpolation=cv2.INTER_AREA)
    return luma


def _whiten(luma: np.ndarray) -> np.ndarray:
    """High-pass, locally normalised residual: the picture's own content becomes roughly white noise."""
    detail = luma - cv2.GaussianBlur(luma, (0, 0), 2.0)
    local = np.sqrt(cv2.GaussianBlur(detail * detail, (0, 0), 8.0) + 1.0)
    return np.clip(detail / local, -3.0, 3.0)


def _autocorrelation(residuals: Sequence[np.ndarray]) -> np.ndarray:
    """Mean circular autocorrelation (zero lag at the centre), normalised to 1 at zero lag."""
    total = None
    for residual in residuals:
        spectrum = np.fft.rfft2(residual - residual.mean())
        acf = np.fft.irfft2(np.abs(spectrum) ** 2, s=residual.shape)
        total = acf if total is None else total + acf
    total = np.fft.fftshift(total)
    return total / total[total.shape[0] // 2, total.shape[1] // 2]


def _subpixel_peak(acf: np.ndarray, lag: np.ndarray, radius: int = 3) -> tuple[np.ndarray, float] | None:
    """Local maximum of the autocorrelation near ``lag`` (row, col offsets from the centre), refined to sub-pixel."""
    centre = np.array(acf.shape) // 2
    row, col = np.rint(centre + lag).astype(int)
    if not (radius + 1 <= row < acf.shape[0] - radius - 1 and radius + 1 <= col < acf.shape[1] - radius - 1):
        return None
    window = acf[row - radius:row + radius + 1, col - radius:col + radius + 1]
    dr, dc = np.unravel_index(int(np.argmax(window)), window.shape)
    row, col = row + dr - radius, col + dc - radius
    value = float(acf[row, col])

    def offset(minus: float, mid: float, plus: float) -> float:
        curve = minus - 2 * mid + plus
        return float(np.clip(0.5 * (minus - plus) / curve, -0.5, 0.5)) if curve < 0 else 0.0

    sub = np.array([row + offset(acf[row - 1, col], value, acf[row + 1, col]),
                    col + offset(acf[row, col - 1], value, acf[row, col + 1])])
    return sub - centre, value


def _refine_lattice(acf: np.ndarray, basis: np.ndarray, reach: int = 4) -> tuple[np.ndarray, float]:
    """Least-squares lattice basis (rows: b1, b2 as (row, col) lags) from the peaks at i*b1 + j*b2, and its score:
    the lowest autocorrelation at b1, b2, b1 + b2 and b1 - b2 (a false finer lattice misses at least one of
    those peaks, a coarser true sub-lattice has them farther out, where the autocorrelation is lower)."""
    limit = 0.45 * min(acf.shape)
    indices, lags = [], []
    for i in range(-reach, reach + 1):
        for j in range(reach + 1):
            if (i, j) == (0, 0) or (j == 0 and i < 0):
                continue
            guess = i * basis[0] + j * basis[1]
            if np.hypot(*guess) > limit:
                continue
            found = _subpixel_peak(acf, guess)
            if found is not None and found[1] > 0:
                indices.append((i, j))
                lags.append(found[0])
    design = np.array(indices, np.float64).reshape(-1, 2)
    if len(indices) < 2 or np.linalg.matrix_rank(design) < 2:
        return basis, -np.inf
    solved, *_ = np.linalg.lstsq(design, np.array(lags), rcond=None)
    values = []
    for i, j in ((1, 0), (0, 1), (1, 1), (1, -1)):
        found = _subpixel_peak(acf, i * solved[0] + j * solved[1], radius=1)
        values.append(found[1] if found is not None else 0.0)
    return solved, float(np.min(values))


def _lattice_candidates(acf: np.ndarray) -> list[np.ndarray]:
    """Up to LATTICE_CANDIDATES bases, best first: square lattices whose side or diagonal is a strong
    autocorrelation peak or a whole fraction of one, refined; the last is always the unmoved reference grid."""
    centre = np.array(acf.shape) // 2
    rows, cols = np.indices(acf.shape)
    radius = np.hypot(rows - centre[0], cols - centre[1])
    ring = (radius >= MIN_PERIOD) & (radius <= min(MAX_PERIOD, 0.45 * min(acf.shape))) & (cols >= centre[1])
    local_max = acf == cv2.dilate(acf.astype(np.float32), np.ones((5, 5), np.uint8))
    peaks = np.argwhere(ring & local_max)
    peaks = peaks[np.argsort(-acf[peaks[:, 0], peaks[:, 1]])][:6]
    hypotheses = []
    for peak in peaks:
        lag = (peak - centre).astype(np.float64)
        for side in (lag, (lag + np.array([-lag[1], lag[0]])) / 2):  # the peak as a side or as a diagonal
            for divisor in (1, 2, 3, 4):
                vector = side / divisor
                if np.hypot(*vector) >= MIN_PERIOD:
                    hypotheses.append(np.stack([vector, np.array([-vector[1], vector[0]])]))
    scored = sorted((_refine_lattice(acf, basis) for basis in hypotheses), key=lambda item: -item[1])
    chosen: list[np.ndarray] = []
    for basis, score in scored:
        if len(chosen) == LATTICE_CANDIDATES - 1 or score == -np.inf:
            break
        # a tile period that is not a whole number of pixels samples the peaks off-centre, so a coarser
        # sub-lattice (2 tiles) can score higher than the true one: take the finest lattice this one is a
        # sub-lattice of, if its peaks are at least half as high (a false finer lattice has ~0 at its points)
        finer = [other for other, other_score in scored if other_score >= 0.5 * score and _refines(other, basis)]
        if finer:
            basis = min(finer, key=lambda other: abs(np.linalg.det(other)))
        if all(not _same_lattice(basis, other) for other in chosen):
            chosen.append(basis)
    chosen.append(np.array([[TILE, 0.0], [0.0, TILE]]))
    return chosen


def _refines(fine: np.ndarray, coarse: np.ndarray) -> bool:
    """Whether every vector of ``coarse`` is a whole combination of ``fine``'s (a finer lattice containing it)."""
    if abs(np.linalg.det(fine)) < 1.0 or abs(np.linalg.det(fine)) >= abs(np.linalg.det(coarse)) - 1.0:
        return False
    coords = np.linalg.solve(fine.T, coarse.T)
    return bool(np.allclose(coords, np.rint(coords), atol=0.05))


def _same_lattice(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two bases span the same lattice (up to a dihedral relabelling), within a pixel."""
    points = [i * b[0] + j * b[1] for i in (-1, 0, 1) for j in (-1, 0, 1)]
    return all(min(np.hypot(*(vector - p)) for p in points) < 1.0 for vector in a)


def _fold(residual: np.ndarray, basis: np.ndarray) -> np.ndarray:
    """Resample ``residual`` onto the lattice ``basis`` (tile = TILE x TILE px) and sum all tiles into one."""
    # canonical (u, v) -> picture (col, row): [col, row] = u * b1' + v * b2' with b' = basis (row, col) / TILE
    to_picture = np.array([[basis[0][1], basis[1][1]], [basis[0][0], basis[1][0]]]) / TILE
    height, width = residual.shape
    corners = np.array([[0, 0], [width, 0], [0, height], [width, height]], np.float64)
    canon = corners @ np.linalg.inv(to_picture).T
    low, high = canon.min(axis=0), canon.max(axis=0)
    size = np.ceil((high - low) / TILE).astype(int) * TILE
    affine = np.hstack([to_picture, (to_picture @ low)[:, None]]).astype(np.float32)
    flags = cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP
    canonical = cv2.warpAffine(residual.astype(np.float32), affine, (int(size[0]), int(size[1])), flags=flags,
                               borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
    tiles = canonical.reshape(size[1] // TILE, TILE, size[0] // TILE, TILE)
    return tiles.sum(axis=(0, 2)).astype(np.float64)


def _orientations(tile: np.ndarray) -> list[np.ndarray]:
    turns = [np.rot90(tile, k) for k in range(4)]
    return turns + [np.fliplr(t) for t in turns]


@dataclasses.dataclass
class WatermarkSearch:
    """The key-independent part of a detection: the lattice hypotheses and each one's band-passed folded tile.
    ``score(key)`` finishes it for one key (so many keys cost little: the benchmark's null trials use that)."""

    bases: list[np.ndarray]
    spectra: list[np.ndarray]
    norms: list[float]

    def score(self, key: int = DEFAULT_KEY, threshold: float = DETECT_THRESHOLD) -> WatermarkResult:
        key_spectra = [np.fft.fft2(tile) for tile in _orientations(key_tile(key))]
        best = WatermarkResult(False, -np.inf, threshold)
        for basis, spectrum, norm in zip(self.bases, self.spectra, self.norms):
            if norm == 0.0:
                continue
            for orientation, key_spectrum in enumerate(key_spectra):
                score = float(np.real(np.fft.ifft2(spectrum * np.conj(key_spectrum))).max()) / norm
                if score > best.score:
                    period = float(np.mean(np.hypot(basis[:, 0], basis[:, 1])))
                    angle = float(np.degrees(np.arctan2(basis[0][0], basis[0][1])))
                    best = WatermarkResult(score > threshold, score, threshold, period, angle, orientation)
        return best


def search_lattices(frames: Sequence[np.ndarray]) -> WatermarkSearch:
    """Whiten, find the lattice hypotheses from the summed autocorrelation, fold every frame onto each."""
    if not len(frames):
        raise ValueError("no frames to look for a watermark in")
    residuals = [_whiten(_analysis_luma(frame)) for frame in frames]
    residuals = [r for r in residuals if r.shape == residuals[0].shape]
    acf = _autocorrelation(residuals)
    search = WatermarkSearch([], [], [])
    band = _band_mask()
    for basis in _lattice_candidates(acf):
        spectrum = np.fft.fft2(sum(_fold(residual, basis) for residual in residuals)) * band
        search.bases.append(basis)
        search.spectra.append(spectrum)
        search.norms.append(math.sqrt(float(np.sum(np.abs(spectrum) ** 2)) / spectrum.size))  # Parseval
    return search


def detect_watermark_frames(frames: Sequence[np.ndarray], key: int = DEFAULT_KEY,
                            threshold: float = DETECT_THRESHOLD) -> WatermarkResult:
    """One decision for pictures that share their geometry (a video's frames): their autocorrelations and folded
    tiles are summed, so the test and its false-alarm bound are those of a single picture."""
    return search_lattices(frames).score(key, threshold)


def detect_watermark(image: np.ndarray, key: int = DEFAULT_KEY, threshold: float = DETECT_THRESHOLD) -> WatermarkResult:
    """Search the picture for the key's tiled pattern (any scale 50-200%, rotation, crop, flip); z against
    ``threshold`` (false alarms <= FALSE_ALARM_BOUND per picture at the default)."""
    return detect_watermark_frames([image], key, threshold)
