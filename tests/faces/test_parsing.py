"""BiSeNet face parser: reference key names, checkpoint containers, strict loading, normalisation, real photos."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from appleswap.faces import segmap
from appleswap.faces.parsing import IMAGENET_MEAN, IMAGENET_STD, FaceParser
from appleswap.files import load_image
from tests.fixtures.tiny_segmenters import bisenet_shapes, random_state, write_bisenet


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return write_bisenet(tmp_path_factory.mktemp("parser") / "FaceParser.pth", seed=0)


@pytest.fixture(scope="module")
def parser(checkpoint):
    return FaceParser.from_file(checkpoint, device="cpu", input_size=256)  # 512 in production; smaller = faster


@pytest.fixture(scope="module")
def photo(faces_dir):
    return load_image(faces_dir / "obama.jpg")


@pytest.fixture(scope="module")
def photo_classes(parser, photo):
    return parser.parse(photo)


def test_reference_key_names_and_shapes_match():
    from appleswap.faces.parsing import BiSeNet

    ours = {k: tuple(v.shape) for k, v in BiSeNet().state_dict().items()}
    assert ours == dict(bisenet_shapes())


def test_parse_real_photo_shape_dtype_and_valid_ids(parser, photo, photo_classes):
    classes = photo_classes
    assert classes.shape == photo.shape[:2] and classes.dtype == np.uint8
    assert classes.max() < len(segmap.CLASS_NAMES)
    assert len(np.unique(classes)) > 1  # random weights still give a varied map, not a constant
    np.testing.assert_array_equal(classes, parser.parse(photo))  # deterministic


def test_parse_batch_matches_single(parser, faces_dir, photo, photo_classes):
    other = load_image(faces_dir / "biden2.jpg")
    batch = parser.parse_batch([photo, other])
    assert [m.shape for m in batch] == [photo.shape[:2], other.shape[:2]]
    # batched convolutions may round differently from single ones, so an exact tie of the two best classes may
    # go either way: pixels may differ only where the single pass's top-2 logits are within float tolerance
    differ = batch[0] != photo_classes
    if differ.any():
        logits = parser.logits_batch([photo])
        logits = torch.nn.functional.interpolate(logits, photo.shape[:2], mode="bilinear", align_corners=False)[0]
        top2 = logits.topk(2, dim=0).values
        margin = (top2[0] - top2[1]).numpy()[differ]
        assert margin.max() <= 1e-5 * float(logits.abs().max()), f"{differ.sum()} pixels differ beyond a tie"
    assert differ.mean() < 1e-4
    assert parser.parse_batch([]) == []


def test_512_input_is_not_resized_and_logits_match_argmax(checkpoint, photo):
    full = FaceParser.from_file(checkpoint, device="cpu")
    assert full.input_size == 512 and not full.parity_double_norm  # the correct behaviour is the default
    crop = np.ascontiguousarray(photo[:512, :512])
    x = full.preprocess([crop])
    assert x.shape == (1, 3, 512, 512)
    with torch.inference_mode():
        logits = full.net(x)
    assert logits.shape == (1, 19, 512, 512)
    np.testing.assert_array_equal(full.parse(crop), logits[0].argmax(0).numpy().astype(np.uint8))


def test_imagenet_normalisation_and_double_norm_parity(checkpoint, parser, photo):
    plain = parser
    parity = FaceParser.from_file(checkpoint, device="cpu", parity_double_norm=True, input_size=256)
    crop = np.ascontiguousarray(photo[:256, :256])
    x = plain.preprocess([crop])
    expected = (torch.from_numpy(crop).permute(2, 0, 1).float() / 255 - torch.tensor(IMAGENET_MEAN).view(3, 1, 1)) \
        / torch.tensor(IMAGENET_STD).view(3, 1, 1)
    torch.testing.assert_close(x[0], expected)
    torch.testing.assert_close(parity.preprocess([crop]), (x - 0.5) / 0.5)
    assert not np.array_equal(plain.parse(crop), parity.parse(crop))


@pytest.mark.parametrize("container", ["module", "wrapped", "old", "safetensors"])
def test_checkpoint_containers_load_to_the_same_model(tmp_path, parser, photo, container):
    suffix = ".safetensors" if container == "safetensors" else ".pth"
    path = write_bisenet(tmp_path / f"parser{suffix}", seed=0, container=container)
    other = FaceParser.from_file(path, device="cpu", input_size=256)
    for (k, a), b in zip(parser.net.state_dict().items(), other.net.state_dict().values()):
        if not k.endswith("num_batches_tracked"):
            assert torch.equal(a, b), k


def test_strict_loading_names_missing_unexpected_and_shape_errors(tmp_path):
    state = random_state(bisenet_shapes(), 1)
    del state["ffm.conv1.weight"]
    state["ffm.extra.weight"] = torch.zeros(1)
    state["conv_out.conv_out.weight"] = torch.zeros(18, 256, 1, 1)  # 18 classes instead of 19
    path = tmp_path / "broken.pth"
    torch.save(state, path)
    with pytest.raises(ValueError) as info:
        FaceParser.from_file(path, device="cpu")
    message = str(info.value)
    assert "ffm.conv1.weight" in message and "ffm.extra.weight" in message
    assert "conv_out.conv_out.weight" in message and str(path) in message


def test_wrong_files_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        FaceParser.from_file(tmp_path / "nope.pth")
    torch.save({"backbone.stem.0.weight": torch.zeros(1)}, tmp_path / "seg.pth")
    with pytest.raises(ValueError, match="not a BiSeNet"):
        FaceParser.from_file(tmp_path / "seg.pth")


def test_bad_image_input_names_the_argument(parser):
    with pytest.raises(ValueError, match=r"images\[0\]"):
        parser.parse(np.zeros((64, 64), np.uint8))
