"""ArcFace recogniser (antelopev2 ``glintr100.onnx``) on onnxruntime.

Input: aligned 112x112 RGB crops normalised as (x - 127.5) / 127.5, NCHW, unless the graph starts with its own
Sub and Mul nodes (then raw 0..255 pixels go in), the same test insightface applies. Output: (N, 512) raw
embeddings, not L2-normalised (PuLID feeds the raw vector to its IDFormer; callers normalise for cosine).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

INPUT_MEAN = 127.5
INPUT_STD = 127.5


class ArcFaceONNX:
    """``embed(crops)``: (N, 112, 112, 3) uint8 RGB crops -> (N, D) float32 embeddings."""

    def __init__(self, path: str | Path, *, providers: list[str] | None = None) -> None:
        import onnxruntime

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"ArcFace model: {path} not found")
        self.session = onnxruntime.InferenceSession(str(path), providers=providers or ["CPUExecutionProvider"])
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            raise ValueError(f"{path}: not an ArcFace graph (want one (N, 3, H, W) input)")
        self.input_name = inputs[0].name
        self.output_name = outputs[0].name
        shape = inputs[0].shape
        self.input_size = shape[2] if isinstance(shape[2], int) else 112
        self.batch_fixed = isinstance(shape[0], int)
        self.dim = outputs[0].shape[-1] if isinstance(outputs[0].shape[-1], int) else None
        self.mean, self.std = (0.0, 1.0) if normalisation_in_graph(path) else (INPUT_MEAN, INPUT_STD)

    def embed(self, crops: np.ndarray) -> np.ndarray:
        """(N, S, S, 3) uint8 RGB crops -> (N, D) float32; one run per crop when the graph's batch is fixed."""
        crops = np.asarray(crops)
        if crops.ndim == 3:
            crops = crops[None]
        if crops.shape[1:] != (self.input_size, self.input_size, 3):
            raise ValueError(f"ArcFace: crops must be (N, {self.input_size}, {self.input_size}, 3), got {crops.shape}")
        blob = ((crops.astype(np.float32) - self.mean) / self.std).transpose(0, 3, 1, 2)
        if self.batch_fixed:
            rows = [self.session.run([self.output_name], {self.input_name: blob[i:i + 1]})[0] for i in range(len(blob))]
            return np.concatenate(rows).astype(np.float32)
        return self.session.run([self.output_name], {self.input_name: np.ascontiguousarray(blob)})[0].astype(np.float32)


def normalisation_in_graph(path: Path) -> bool:
    """True when the first nodes of the graph subtract and multiply (the pixel normalisation is built in)."""
    import onnx

    nodes = onnx.load(str(path), load_external_data=False).graph.node[:8]
    names = [node.name for node in nodes]
    has_sub = any(n.startswith(("Sub", "_minus")) for n in names)
    has_mul = any(n.startswith(("Mul", "_mul")) for n in names)
    return has_sub and has_mul
