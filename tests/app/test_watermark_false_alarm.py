"""The watermark detector's false-alarm rate on unmarked photos, through the public API only
(``detect_watermark(image, key=...)`` -> ``.detected``, ``.score``, ``.threshold``), so it holds for any detector
that reports a z-like score against a threshold.

An unmarked photo correlates with a key's pattern by chance only, and the detector reports the best correlation
over its search: over many keys and photos those maxima follow a Gumbel law, whose fitted tail at the threshold is
the false-alarm rate (the issue asks for at most 0.1 %).
"""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from appleswap.files import load_image
from appleswap.provenance.watermark import detect_watermark, embed_watermark

PHOTOS = ("obama1", "biden2", "two_people", "obama_and_biden", "obama3", "biden")
KEYS = range(1000, 1006)
MAX_FALSE_ALARM = 1e-3  # per photo: the goal (0.1 %)


def _jpeg(image: np.ndarray, quality: int) -> np.ndarray:
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return np.asarray(Image.open(buffer).convert("RGB"))


@pytest.fixture(scope="module")
def unmarked(faces_dir):
    """Real unmarked photos, as decoded and after a JPEG round trip, plus a flat and a noisy synthetic frame."""
    images = []
    for name in PHOTOS:
        photo = load_image(faces_dir / f"{name}.jpg")[:256, :320]
        images += [photo, _jpeg(photo, 80)]
    rng = np.random.default_rng(0)
    images.append(np.clip(rng.normal(128, 30, (256, 256, 3)), 0, 255).astype(np.uint8))
    images.append(np.full((256, 256, 3), 77, np.uint8) + rng.integers(0, 2, (256, 256, 3), dtype=np.uint8))
    return images


@pytest.fixture(scope="module")
def results(unmarked):
    return [detect_watermark(image, key=key) for image in unmarked for key in KEYS]


def test_no_unmarked_photo_is_flagged(results):
    assert not any(result.detected for result in results)
    assert all(result.detected == (result.score > result.threshold) for result in results)


def test_unmarked_scores_follow_the_law_of_a_searched_maximum(results):
    """With no mark the score is the best chance correlation over the detector's search (shifts, scales, flips and
    turns): a maximum of many near-Gaussian correlations, so a Gumbel law, narrow and well above 0."""
    scores = np.array([result.score for result in results])
    loc, scale = stats.gumbel_r.fit(scores)
    assert 0.1 < scale < 1.0 and 2.0 < loc < 6.0, (loc, scale)
    assert stats.kstest(scores, "gumbel_r", args=(loc, scale)).pvalue > 1e-3


def test_threshold_gives_a_false_alarm_rate_below_the_goal(results):
    """The issue's goal is <= 0.1 % false positives; the fitted Gumbel tail at the threshold must be far below it
    (a threshold lowered to 4, as a planted bug did, flags most unmarked photos)."""
    scores = np.array([result.score for result in results])
    threshold = min(result.threshold for result in results)
    loc, scale = stats.gumbel_r.fit(scores)
    rate = stats.gumbel_r.sf(threshold, loc, scale)
    assert rate < MAX_FALSE_ALARM, f"threshold {threshold}: false-alarm rate {rate:.1e} per photo"


def test_marked_photo_is_still_found_with_its_key_only(unmarked):
    photo = unmarked[0]
    marked = _jpeg(embed_watermark(photo, key=KEYS[0]), 90)
    assert detect_watermark(marked, key=KEYS[0]).detected
    assert not any(detect_watermark(marked, key=key).detected for key in KEYS[1:6])
