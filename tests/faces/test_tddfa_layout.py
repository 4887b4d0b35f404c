"""The networks at their real widths carry the parameter names and shapes of the released 3DDFA-V3 files."""

from __future__ import annotations

import torch
import torchvision

from appleswap.faces.tddfa.landmark106 import LargeBaseLmksNet
from appleswap.faces.tddfa.recon import ReconNet
from appleswap.faces.tddfa.resnet import ResNetTrunk, trunk_shape
from appleswap.faces.tddfa.retinaface import RetinaFaceNet


def _shapes(module: torch.nn.Module, prefix: str = "") -> dict[str, tuple[int, ...]]:
    return {prefix + k: tuple(v.shape) for k, v in module.state_dict().items()}


def test_trunk_equals_torchvision_resnet50_names_shapes_and_outputs():
    reference = torchvision.models.resnet50(weights=None).eval()
    ours = ResNetTrunk().eval()
    expected = {k: v for k, v in _shapes(reference).items() if not k.startswith("fc.")}
    assert _shapes(ours) == expected
    ours.load_state_dict({k: v for k, v in reference.state_dict().items() if not k.startswith("fc.")})
    x = torch.rand(1, 3, 64, 64)
    body = torchvision.models._utils.IntermediateLayerGetter(reference, {"layer2": 0, "layer3": 1, "layer4": 2})
    with torch.no_grad():
        for a, b in zip(ours(x), body(x).values()):
            torch.testing.assert_close(a, b)
    assert trunk_shape(ours.state_dict(), "") == (64, (3, 4, 6, 3))


def test_retinaface_real_layout():
    shapes = _shapes(RetinaFaceNet())
    assert shapes["body.conv1.weight"] == (64, 3, 7, 7)
    assert shapes["fpn.output1.0.weight"] == (256, 512, 1, 1)
    assert shapes["fpn.output3.0.weight"] == (256, 2048, 1, 1)
    assert shapes["fpn.merge2.1.running_var"] == (256,)
    assert shapes["ssh1.conv3X3.0.weight"] == (128, 256, 3, 3)
    assert shapes["ssh2.conv5X5_1.0.weight"] == (64, 256, 3, 3)
    assert shapes["ssh3.conv7x7_3.1.weight"] == (64,)
    assert shapes["ClassHead.0.conv1x1.weight"] == (4, 256, 1, 1)
    assert shapes["BboxHead.2.conv1x1.weight"] == (8, 256, 1, 1)
    assert shapes["LandmarkHead.1.conv1x1.bias"] == (20,)
    assert not [k for k in shapes if k.startswith("body.fc")]


def test_landmark_net_real_layout():
    shapes = _shapes(LargeBaseLmksNet())
    assert shapes["block1.0.weight"] == (64, 3, 3, 3) and shapes["block1.2.weight"] == (64,)
    assert shapes["block2.conv.0.weight"] == (128, 64, 1, 1)
    assert shapes["block3.conv.3.weight"] == (128, 1, 3, 3)  # depthwise
    assert shapes["block8.conv.6.weight"] == (128, 128, 1, 1)
    assert shapes["block9.conv.0.weight"] == (512, 128, 1, 1)
    assert shapes["block18.0.weight"] == (256, 128, 3, 3)
    assert shapes["block19.weight"] == (106, 256, 3, 3)
    out = LargeBaseLmksNet(width=8).eval()(torch.rand(1, 3, 224, 224))
    assert out.shape == (1, 212) and bool(((out >= 0) & (out < 1)).all())


def test_regressor_real_layout():
    shapes = _shapes(ReconNet())
    assert shapes["backbone.layer4.2.conv3.weight"] == (2048, 512, 1, 1)
    heads = [shapes[f"final_layers.{i}.weight"][0] for i in range(7)]
    assert heads == [80, 64, 80, 3, 27, 2, 1]
    assert shapes["final_layers.6.bias"] == (1,)
    assert ReconNet(width=4, blocks=(1, 1, 1, 1)).eval()(torch.rand(2, 3, 224, 224)).shape == (2, 257)
