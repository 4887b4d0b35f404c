"""Weight files with the REAL key names of each evaluation network, at reduced depth/width, built by the tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from appleswap.eval.fid import FIDInception
from appleswap.face_metrics.arcface import IRSE50
from appleswap.face_metrics.expression import ReconNet
from appleswap.face_metrics.pose import HopeNet

TINY_UNITS = (1, 1, 1, 1)
TINY_CHANNELS = (8, 16, 24, 32)


def _randomise_bn(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial BatchNorm statistics so eval-mode outputs depend on every layer."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, (torch.nn.BatchNorm1d, torch.nn.BatchNorm2d)):
            module.running_mean.copy_(torch.randn(module.running_mean.shape, generator=generator) * 0.1)
            module.running_var.copy_(torch.rand(module.running_var.shape, generator=generator) + 0.5)


def tiny_irse50(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = IRSE50(TINY_UNITS, TINY_CHANNELS)
    _randomise_bn(model, seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)  # the released file is a plain torch state dict
    return path


def tiny_hopenet(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = HopeNet((1, 1, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return path


def tiny_deep3d(path: Path, seed: int = 0) -> Path:
    torch.manual_seed(seed)
    model = ReconNet((1, 1, 1, 1))
    for layer in model.final_layers:
        torch.nn.init.normal_(layer.weight, std=0.05)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"net_recon": model.state_dict(), "epoch": 20}, path)  # epoch_20.pth layout
    return path


def inception(path: Path, seed: int = 0) -> Path:
    """The FID Inception at real size (its blocks have fixed widths) with random weights."""
    torch.manual_seed(seed)
    model = FIDInception()
    for module in model.modules():  # He init keeps activations alive through 40+ layers (default init fades out)
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.net.state_dict(), path)
    return path


def tiny_glint_onnx(path: Path, seed: int = 0) -> Path:
    """An ONNX recogniser with glintr100's signature: input.1 (N, 3, 112, 112) float -> (N, 512)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    conv = numpy_helper.from_array(rng.normal(0, 0.2, (16, 3, 8, 8)).astype(np.float32), "conv_w")
    fc = numpy_helper.from_array(rng.normal(0, 0.2, (16 * 14 * 14, 512)).astype(np.float32), "fc_w")
    shape = numpy_helper.from_array(np.array([-1, 16 * 14 * 14], dtype=np.int64), "flat_shape")
    nodes = [helper.make_node("Conv", ["input.1", "conv_w"], ["c"], strides=[8, 8]),
             helper.make_node("Relu", ["c"], ["r"]), helper.make_node("Reshape", ["r", "flat_shape"], ["f"]),
             helper.make_node("MatMul", ["f", "fc_w"], ["683"])]
    graph = helper.make_graph(nodes, "tiny_glint",
                              [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, ["None", 3, 112, 112])],
                              [helper.make_tensor_value_info("683", TensorProto.FLOAT, ["None", 512])],
                              initializer=[conv, fc, shape])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    path.parent.mkdir(parents=True, exist_ok=True)
    onnx.save(model, str(path))
    return path


def weights_folder(root: Path) -> Path:
    """A --weights-dir laid out like the registry expects, every eval network present (tiny)."""
    tiny_irse50(root / "eval" / "model_ir_se50.pth")
    tiny_hopenet(root / "eval" / "hopenet_robust_alpha1.pkl")
    tiny_deep3d(root / "eval" / "deep3d_epoch_20.pth")
    inception(root / "eval" / "pt_inception-2015-12-05-6726825d.pth")
    tiny_glint_onnx(root / "antelopev2" / "glintr100.onnx")
    (root / "antelopev2" / "scrfd_10g_bnkps.onnx").write_bytes(b"")  # present for the registry's dir check only
    return root
