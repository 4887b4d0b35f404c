"""Occlusion segmenter: mmseg key names, safe checkpoint reading, the reference test pipeline, flip modes."""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from appleswap.faces.occlusion import (
    MEAN,
    STD,
    DeepLabConfig,
    DeepLabV3Plus,
    OcclusionSegmenter,
    convert_checkpoint,
    read_mmseg_checkpoint,
)
from appleswap.files import load_image
from tests.fixtures import tiny_segmenters
from tests.fixtures.tiny_segmenters import TINY_DEEPLAB, deeplab_shapes, random_state, write_deeplab

TINY = DeepLabConfig(stage_blocks=(1, 1, 1, 1), stem_channels=16, base_channels=8, channels=16, c1_channels=8)


@pytest.fixture(scope="module")
def face512(faces_dir):
    image = load_image(faces_dir / "biden2.jpg")  # 1200x1200 studio portrait
    return np.ascontiguousarray(image[100:612, 344:856])


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, face512):
    """Random weights, with the class-1 bias set so about half of the test face is 'visible' (varied masks)."""
    path = write_deeplab(tmp_path_factory.mktemp("occ") / "deeplabv3_iter_27600.pth", seed=0)
    probe = OcclusionSegmenter.from_file(path, device="cpu", config=TINY)
    scores = probe.probabilities(face512)
    return write_deeplab(path, seed=0, class1_shift=float((scores[1] - scores[0]).median()))


@pytest.fixture(scope="module")
def segmenter(checkpoint):
    return OcclusionSegmenter.from_file(checkpoint, device="cpu", config=TINY)


def test_full_architecture_matches_mmseg_names_and_shapes():
    with torch.device("meta"):
        ours = {k: tuple(v.shape) for k, v in DeepLabV3Plus().state_dict().items()}
    expected = {k: v for k, v in deeplab_shapes(with_aux=False).items()}
    assert ours == expected
    assert ours["backbone.layer3.22.conv3.weight"] == (1024, 256, 1, 1)  # ResNet-101: 23 blocks in stage 3
    assert ours["decode_head.bottleneck.conv.weight"] == (512, 2560, 3, 3)
    assert ours["decode_head.sep_bottleneck.0.depthwise_conv.conv.weight"] == (560, 1, 3, 3)


def test_tiny_config_keeps_the_naming():
    ours = {k: tuple(v.shape) for k, v in DeepLabV3Plus(TINY).state_dict().items()}
    assert ours == dict(deeplab_shapes(**TINY_DEEPLAB, with_aux=False))


def test_mmcv_checkpoint_with_pickled_metadata_loads_safely(checkpoint):
    tiny_segmenters.FakeHistoryBuffer.constructed = 0
    with pytest.raises(pickle.UnpicklingError):  # plain weights_only refuses the metadata...
        torch.load(checkpoint, weights_only=True)
    state = read_mmseg_checkpoint(checkpoint)  # ...our reader keeps weights_only and ignores it
    assert tiny_segmenters.FakeHistoryBuffer.constructed == 0
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert "auxiliary_head.conv_seg.weight" in state and "decode_head.conv_seg.weight" in state


def test_visible_on_real_photos_shape_dtype_and_determinism(segmenter, faces_dir):
    for name in ("obama_partial_face.jpg", "two_people.jpg"):  # portrait 491x1137 and landscape 1126x661
        image = load_image(faces_dir / name)
        mask = segmenter.visible(image)
        assert mask.shape == image.shape[:2] and mask.dtype == bool
        assert 0 < mask.mean() < 1
    np.testing.assert_array_equal(mask, segmenter.visible(image))


def test_input_pipeline_resize_multiple_and_normalisation(segmenter, faces_dir, face512):
    x = segmenter.prepare(face512, mirrored=False)
    expected = (torch.from_numpy(face512).permute(2, 0, 1).float() - torch.tensor(MEAN).view(3, 1, 1)) \
        / torch.tensor(STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], expected)  # 512 input: no resize, RGB order, mmseg mean/std
    torch.testing.assert_close(segmenter.prepare(face512, mirrored=True), x.flip(dims=(3,)))
    tall = load_image(faces_dir / "obama2.jpg")  # 626x1200 -> keep ratio 267x512 -> multiple of 32: 288x512
    assert segmenter.prepare(tall, mirrored=False).shape == (1, 3, 512, 288)
    bgr = face512[..., ::-1].copy()
    np.testing.assert_array_equal(segmenter.visible(bgr, bgr=True), segmenter.visible(face512))


def test_flip_only_parity_mode_is_the_mirrored_plain_prediction(checkpoint, segmenter, face512):
    parity = OcclusionSegmenter.from_file(checkpoint, device="cpu", flip="only", config=TINY)
    mirrored_plain = segmenter.visible(np.ascontiguousarray(face512[:, ::-1]))[:, ::-1]
    np.testing.assert_array_equal(parity.visible(face512), mirrored_plain)


def test_flip_average_mode_averages_both_views(checkpoint, segmenter, face512):
    average = OcclusionSegmenter.from_file(checkpoint, device="cpu", flip="average", config=TINY)
    parity = OcclusionSegmenter.from_file(checkpoint, device="cpu", flip="only", config=TINY)
    expected = (segmenter.probabilities(face512).softmax(0) + parity.probabilities(face512).softmax(0)) / 2
    torch.testing.assert_close(average.probabilities(face512), expected)
    with pytest.raises(ValueError, match="flip"):
        OcclusionSegmenter.from_file(checkpoint, device="cpu", flip="both", config=TINY)


def test_safetensors_conversion_round_trip(tmp_path, checkpoint, segmenter, face512):
    converted = convert_checkpoint(checkpoint, tmp_path / "occlusion.safetensors")
    again = OcclusionSegmenter.from_file(converted, device="cpu", config=TINY)
    torch.testing.assert_close(again.probabilities(face512), segmenter.probabilities(face512))


def test_strict_loading_lists_bad_keys(tmp_path):
    state = random_state(deeplab_shapes(**TINY_DEEPLAB), 3)
    del state["decode_head.c1_bottleneck.conv.weight"]
    state["decode_head.unknown.weight"] = torch.zeros(1)
    path = tmp_path / "broken.pth"
    torch.save({"meta": {}, "state_dict": state}, path)
    with pytest.raises(ValueError) as info:
        OcclusionSegmenter.from_file(path, device="cpu", config=TINY)
    assert "decode_head.c1_bottleneck.conv.weight" in str(info.value)
    assert "decode_head.unknown.weight" in str(info.value)
    with pytest.raises(ValueError, match="missing keys"):  # a tiny file is not the full ResNet-101 model
        OcclusionSegmenter.from_file(tmp_path / "broken.pth", device="cpu")
    with pytest.raises(FileNotFoundError, match="absent.pth"):
        OcclusionSegmenter.from_file(tmp_path / "absent.pth")
