"""Loss pieces: logit-normal t, gating, flow matching, LPIPS from local VGG weights, the SimSwap ArcFace converter."""

from __future__ import annotations

import sys

import pytest
import torch
from torch import nn

from appleswap.train import losses
from appleswap.train.arcface import ArcFaceResNet, IRBlock, SqueezeExcite, convert_simswap_arcface, load_arcface


def test_logit_normal_timesteps():
    t = losses.sample_timesteps(20000, generator=torch.Generator().manual_seed(0))
    assert 0 < t.min() and t.max() < 1
    assert abs(t.median().item() - 0.5) < 0.01
    assert abs((t <= 0.35).float().mean().item() - 0.27) < 0.01  # spec: ~27% pass the 0.35 gate


def test_gated_mean_and_flow_matching():
    per = torch.tensor([1.0, 2.0, 3.0, 4.0])
    t = torch.tensor([0.1, 0.5, 0.3, 0.9])
    assert losses.gated_mean(per, t, 0.35).item() == pytest.approx(2.0)
    assert losses.gated_mean(per, t, 0.05).item() == 0.0
    x0, noise = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    tt = torch.tensor([0.2, 0.7])
    x_t = losses.noisy_latents(x0, noise, tt)
    assert losses.flow_matching_loss(noise - x0, noise, x0).item() == 0.0
    torch.testing.assert_close(losses.predicted_x0(x_t, tt, noise - x0), x0)


def test_lpips_from_local_vgg(tmp_path):
    import torchvision

    from appleswap.files import save_tensors

    torch.manual_seed(0)
    vgg = torchvision.models.vgg16(weights=None).features.state_dict()
    save_tensors(tmp_path / "vgg.safetensors", {f"features.{k}": v for k, v in vgg.items()})
    model = losses.build_lpips(tmp_path / "vgg.safetensors")
    torch.testing.assert_close(getattr(model.net.slice3, "10").weight, vgg["10.weight"])
    from pathlib import Path

    import lpips

    heads = torch.load(Path(lpips.__file__).parent / "weights/v0.1/vgg.pth", map_location="cpu", weights_only=True)
    torch.testing.assert_close(model.lin0.model[1].weight, heads["lin0.model.1.weight"])  # package heads loaded
    a, b = torch.rand(1, 3, 64, 64) * 2 - 1, torch.rand(1, 3, 64, 64) * 2 - 1
    assert model(a, a).item() == pytest.approx(0.0, abs=1e-6) and model(a, b).item() > 0
    with pytest.raises(ValueError, match="features"):
        save_tensors(tmp_path / "bad.safetensors", {"x": torch.zeros(1)})
        losses.build_lpips(tmp_path / "bad.safetensors")


def test_convert_simswap_pickle_without_running_it(tmp_path, monkeypatch):
    """A pickle laid out like SimSwap's (dict with a DataParallel of models.arcface_models.ResNet, an optimizer)."""
    package = tmp_path / "models"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "arcface_models.py").write_text(
        "from torch import nn\nclass SEBlock(nn.Module): pass\nclass IRBlock(nn.Module): pass\n"
        "class ResNet(nn.Module): pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    import models.arcface_models as fake

    torch.manual_seed(0)
    model = ArcFaceResNet((2, 1, 1, 1)).eval()
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
    x = torch.randn(2, 3, 112, 112)
    expected = model(x)
    for module in model.modules():
        module.__class__ = {IRBlock: fake.IRBlock, SqueezeExcite: fake.SEBlock, ArcFaceResNet: fake.ResNet}.get(
            type(module), type(module))
    torch.save({"epoch": 1, "model": nn.DataParallel(model), "optimizer": torch.optim.SGD(model.parameters(), 0.1)},
               tmp_path / "arcface_checkpoint.tar")
    del sys.modules["models.arcface_models"], sys.modules["models"]
    out = convert_simswap_arcface(tmp_path / "arcface_checkpoint.tar", tmp_path / "arc.safetensors")
    loaded = load_arcface(out)
    assert loaded.layers_config == (2, 1, 1, 1)
    torch.testing.assert_close(loaded(x), expected)
    with pytest.raises(ValueError, match="safetensors"):
        load_arcface(tmp_path / "arcface_checkpoint.tar")
