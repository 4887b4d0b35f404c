"""CUDA-graph runner: input bookkeeping on any machine; recording and replay where CUDA exists (not in CI)."""

from __future__ import annotations

import pytest
import torch

from appleswap.model.transformer import TextEmbeddings
from appleswap.speed.cuda_graph import CudaGraphRunner, map_tensors, signature
from appleswap.speed.transformer import ConditionModulation
from tests.speed.test_speed_options import _call, _full_model, _inputs


def test_map_tensors_walks_dataclasses_lists_and_dicts_in_order():
    text = TextEmbeddings(torch.zeros(1, 2, 3), torch.ones(1, 4), torch.zeros(2, 3))
    modulation = ConditionModulation(torch.ones(1, 5), [torch.ones(1, 1, 6), torch.ones(1, 1, 3)])
    seen = []
    doubled = map_tensors(((torch.ones(2),), {"text": text, "modulation": modulation, "w": 0.5}),
                          lambda t: seen.append(t.shape) or t * 2)
    assert seen == [(2,), (1, 2, 3), (1, 4), (2, 3), (1, 5), (1, 1, 6), (1, 1, 3)]
    assert isinstance(doubled[1]["text"], TextEmbeddings) and doubled[1]["w"] == 0.5
    assert torch.equal(doubled[1]["modulation"].rows[1], torch.full((1, 1, 3), 2.0))


def test_signature_separates_what_a_recording_bakes_in():
    base = signature(((torch.zeros(2, 3),), {"id_weight": 1.0, "condition": None}))
    assert base == signature(((torch.ones(2, 3),), {"id_weight": 1.0, "condition": None}))  # values do not matter
    assert base != signature(((torch.zeros(3, 3),), {"id_weight": 1.0, "condition": None}))  # shapes do
    assert base != signature(((torch.zeros(2, 3),), {"id_weight": 0.5, "condition": None}))  # python scalars do
    assert base != signature(((torch.zeros(2, 3, dtype=torch.float64),), {"id_weight": 1.0, "condition": None}))


@torch.no_grad()
def test_enabled_cuda_graphs_leave_cpu_passes_unchanged():
    model, inp = _full_model(), _inputs()
    plain = _call(model, inp)
    model.enable_cuda_graphs()
    torch.testing.assert_close(_call(model, inp), plain, rtol=0, atol=0)
    assert model.graph_runner.recordings == {}  # nothing recorded off CUDA
    model.fuse_projections()  # changing the weights drops recordings
    assert model.graph_runner.recordings == {}


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA (GPU benchmark machines only)")
@torch.no_grad()
def test_replay_equals_eager_on_cuda():
    model, inp = _full_model().cuda(), _inputs()
    inp = map_tensors(inp, lambda t: t.cuda())
    eager = _call(model, inp)
    runner = CudaGraphRunner(model._forward)
    model.graph_runner = runner
    torch.testing.assert_close(_call(model, inp), eager)
    other = dict(inp, latents=inp["latents"] * 0.5)
    torch.testing.assert_close(_call(model, other), _call_eager(model, other))
    assert len(runner.recordings) == 1


def _call_eager(model, inp):
    runner, model.graph_runner = model.graph_runner, None
    try:
        return _call(model, inp)
    finally:
        model.graph_runner = runner
