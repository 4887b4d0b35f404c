"""SCRFD output decoding, NMS and the 5-point alignments."""

from __future__ import annotations

import numpy as np
import pytest

from appleswap.identity.align import ARCFACE_TEMPLATE_112, arcface_crop, face_crop_512, similarity_lstsq
from appleswap.identity.scrfd import anchor_centers, decode_outputs, nms
from tests.fixtures.tiny_identity import DET_SIZE, PLANTED_BOX, PLANTED_KPS, planted_outputs


def test_decode_recovers_planted_face():
    scores, boxes, kps = decode_outputs(planted_outputs(0.8), (DET_SIZE, DET_SIZE), threshold=0.5)
    assert scores.shape == (1,) and scores[0] == pytest.approx(0.8)
    np.testing.assert_allclose(boxes[0], PLANTED_BOX, atol=1e-4)
    np.testing.assert_allclose(kps[0], PLANTED_KPS, atol=1e-4)
    assert len(decode_outputs(planted_outputs(0.4), (DET_SIZE, DET_SIZE), threshold=0.5)[0]) == 0


def test_decode_batched_layout_and_bad_count():
    batched = [out[None] for out in planted_outputs(0.9)]
    assert len(decode_outputs(batched, (DET_SIZE, DET_SIZE), 0.5)[0]) == 1
    with pytest.raises(ValueError, match="9 outputs"):
        decode_outputs(planted_outputs(0.9)[:6], (DET_SIZE, DET_SIZE), 0.5)


def test_anchor_centers_order():
    centers = anchor_centers(2, 3, 8)
    assert centers.shape == (12, 2)
    np.testing.assert_array_equal(centers[:4], [[0, 0], [0, 0], [8, 0], [8, 0]])  # x varies fastest, 2 anchors
    np.testing.assert_array_equal(centers[6], [0, 8])


def test_nms_drops_overlaps():
    boxes = np.array([[0, 0, 10, 10], [1, 1, 11, 11], [50, 50, 60, 60]], np.float32)
    assert nms(boxes, np.array([0.9, 0.8, 0.7]), 0.4) == [0, 2]


def test_similarity_recovers_transform_and_crops():
    angle, scale, shift = 0.3, 2.5, np.array([40.0, -7.0])
    rot = scale * np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
    src = ARCFACE_TEMPLATE_112.astype(np.float64)
    dst = src @ rot.T + shift
    np.testing.assert_allclose(similarity_lstsq(src, dst), np.c_[rot, shift], atol=1e-6)
    image = np.random.default_rng(0).integers(0, 255, (300, 300, 3), dtype=np.uint8)
    kps = ARCFACE_TEMPLATE_112 * 2 + 20
    assert arcface_crop(image, kps).shape == (112, 112, 3)
    crop, matrix = face_crop_512(image, kps)
    assert crop.shape == (512, 512, 3) and matrix.shape == (2, 3)


def test_similarity_matches_skimage_estimate():
    """insightface's norm_crop uses skimage's SimilarityTransform; ours must give the same matrix."""
    from skimage.transform import SimilarityTransform

    rng = np.random.default_rng(1)
    src = ARCFACE_TEMPLATE_112 * 3 + rng.normal(0, 4, (5, 2)) + 100
    transform = SimilarityTransform()
    transform.estimate(src, ARCFACE_TEMPLATE_112)
    np.testing.assert_allclose(similarity_lstsq(src, ARCFACE_TEMPLATE_112), transform.params[:2], atol=1e-6)
