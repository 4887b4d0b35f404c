"""The Triton kernels of :mod:`appleswap.speed.kernels` against their reference torch code.

No GPU here: the kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, numpy on the CPU) in a subprocess.
The interpreter rounds fp32 to bf16 by truncation where the GPU rounds to nearest, so bf16 is compared within
three ulps of each head's largest value (the norm's rounding enters through cos and sin, then the output's) and
fp32 tightly. The op's fake-tensor path (what ``torch.compile`` traces) is checked separately.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from torch import nn

from appleswap.speed import kernels

pytestmark = pytest.mark.skipif(kernels.triton is None, reason="Triton not installed")

SETUP = """
import torch
from torch import nn
from appleswap.speed import kernels

def double_block_parts(dtype, batch=2, heads=3, dim=32, text=5, image=37):
    torch.manual_seed(0)
    width = heads * dim
    text_out = torch.randn(batch, text, 3 * width + 8).to(dtype)  # [q | k | v | LoRA columns], as fused outputs
    image_out = (torch.randn(batch, image, 4 * width) * 3).to(dtype)
    norms = [nn.RMSNorm(dim, eps=1e-6).to(dtype) for _ in range(4)]
    for norm in norms:
        norm.weight.data = (torch.rand(dim) + 0.5).to(dtype)
    angles = torch.rand(text + image, dim // 2) * 6
    rotary = (angles.cos().repeat_interleave(2, -1), angles.sin().repeat_interleave(2, -1))
    q = [text_out[..., :width], image_out[..., :width]]
    k = [text_out[..., width:2 * width], image_out[..., width:2 * width]]
    return q, k, norms[:2], norms[2:], rotary, dim
"""


def _interpreted(code: str) -> str:
    env = dict(os.environ, TRITON_INTERPRET="1")
    src = os.path.join(os.path.dirname(kernels.__file__), "..", "..")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [os.path.abspath(src), env.get("PYTHONPATH", "")]))
    result = subprocess.run([sys.executable, "-c", textwrap.dedent(SETUP) + textwrap.dedent(code)], check=False, env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout


def test_qk_norm_rope_kernel_matches_reference_in_the_interpreter():
    out = _interpreted("""
        for dtype in (torch.float32, torch.bfloat16):
            q, k, q_norms, k_norms, rotary, dim = double_block_parts(dtype)
            ref = kernels.qk_norm_rope_reference(q, k, q_norms, k_norms, rotary, dim)
            got = kernels.launch_qk_norm_rope(q, k, [n.weight for n in q_norms], [n.weight for n in k_norms],
                                              *rotary, 1e-6, dim, wrap=False)
            worst_abs = worst_ulps = 0.0
            for r, g in zip(ref, got):
                assert g.shape == r.shape and g.dtype == r.dtype, (g.shape, r.shape)
                error = (g.float() - r.float()).abs()
                ulp = torch.finfo(dtype).eps * r.float().abs().amax(-1, keepdim=True)  # at the head's largest value
                worst_abs, worst_ulps = max(worst_abs, float(error.max())), max(worst_ulps, float((error / ulp).max()))
            print(dtype, worst_abs, worst_ulps)
        # one part (single blocks), batch 1
        q, k, q_norms, k_norms, (cos, sin), dim = double_block_parts(torch.float32, batch=1)
        ref = kernels.qk_norm_rope_reference(q[1:], k[1:], q_norms[1:], k_norms[1:], (cos[5:], sin[5:]), dim)
        got = kernels.launch_qk_norm_rope(q[1:], k[1:], [q_norms[1].weight], [k_norms[1].weight], cos[5:], sin[5:],
                                          1e-6, dim, wrap=False)
        print("single", max(float((g - r).abs().max()) for r, g in zip(ref, got)))
    """)
    lines = {line.split()[0]: [float(v) for v in line.split()[1:]] for line in out.strip().splitlines()}
    assert lines["torch.float32"][0] < 1e-5  # fp32: summation order and rsqrt only (values up to ~10)
    assert lines["torch.bfloat16"][1] <= 3.01  # norm rounding (through cos and sin), then the output's
    assert lines["single"][0] < 1e-5


def test_join_rows_kernel_matches_the_reference_in_the_interpreter():
    """[a | gelu(b) | z on the last rows], zero-padded: joined in the input dtype, or quantised per row to e4m3."""
    out = _interpreted("""
        from appleswap.speed.fp8_linear import quantize_activation_rows
        for dtype in (torch.float32, torch.bfloat16):
            big = (torch.randn(2, 9, 200) * 3).to(dtype)
            a, b, tail = big[..., :48], big[..., 48:144], torch.randn(2, 4, 16).to(dtype)
            width = 48 + 96 + 16 + 16
            x = kernels.ConcatInput((a, b), (None, "tanh"), tail)
            ref = x.join(width)
            got, _ = kernels.launch_join_rows(a, b, tail, False, True, width, False, wrap=False)
            ulp = torch.finfo(dtype).eps * ref.float().abs().clamp(min=1)
            print("join", dtype, float(((got.float() - ref.float()).abs() / ulp).max()))
            one, _ = kernels.launch_join_rows(b, None, tail, True, False, 96 + 16, False, wrap=False)
            ref_one = kernels.ConcatInput((b,), ("tanh",), tail).join()
            print("one", dtype, float(((one.float() - ref_one.float()).abs()).max()))
        q_ref, s_ref = quantize_activation_rows(ref.reshape(-1, width))
        q, s = kernels.launch_join_rows(a, b, tail, False, True, width, True, wrap=False)
        q = q.reshape(-1, width)
        steps = (q.view(torch.int8).int() - q_ref.view(torch.int8).int()).abs()
        # Triton's interpreter (not the GPU) loses the carry when a value rounds up to a power of two (124.2 gives
        # 64, not 128): checked in its own test below
        interpreter_quirk = (q.float() * 2 == q_ref.float()) & (torch.frexp(q_ref.float()).mantissa.abs() == 0.5)
        worst = int(steps[~interpreter_quirk].max())
        print("fp8", float(((s - s_ref).abs() / s_ref).max()), worst, int(q[:, -16:].float().abs().sum()))
    """)
    lines = {" ".join(line.split()[:-1]): float(line.split()[-1]) for line in out.strip().splitlines() if not
             line.startswith("fp8")}
    assert lines["join torch.float32"] < 4 and lines["one torch.float32"] < 1e-5
    assert lines["join torch.bfloat16"] <= 1.01  # GELU's rounding (truncated in the interpreter)
    fp8 = next(line for line in out.splitlines() if line.startswith("fp8")).split()
    assert float(fp8[1]) < 1e-6  # the same row scales
    assert int(fp8[2]) <= 1  # e4m3 codes at most one step apart (the bf16 GELU rounding above)
    assert int(fp8[3]) == 0  # the padding columns are zeros


def test_join_rows_layer_norm_modulation_matches_the_reference_in_the_interpreter():
    """[AdaLN(LayerNorm(x)) | z]: each token's branch row (image / condition), or one row broadcast over the batch."""
    out = _interpreted("""
        from appleswap.speed.fp8_linear import quantize_activation_rows
        torch.manual_seed(0)
        for dtype in (torch.float32, torch.bfloat16):
            x = (torch.randn(2, 11, 96) * 4 + 1).to(dtype)
            mod = (torch.randn(2, 2, 3 * 96) * 0.5).to(dtype)  # (B, branch, 3D): chunks are strided views
            shift, scale, _ = mod.chunk(3, dim=-1)
            tail = torch.randn(2, 4, 8).to(dtype)
            joined = kernels.ConcatInput((x,), (None,), tail, kernels.RowModulation(shift, scale, 7, 1e-6))
            ref = joined.join(112)
            got, _ = kernels.launch_join_rows(x, None, tail, False, False, 112, False, shift, scale, 7, 1e-6,
                                              wrap=False)
            ulp = torch.finfo(dtype).eps * ref.float().abs().amax(-1, keepdim=True)
            print("norm", dtype, float(((got.float() - ref.float()).abs() / ulp).max()))
            one = kernels.ConcatInput((x,), (None,), norm=kernels.RowModulation(shift[:1, :1], scale[:1, :1], None,
                                                                                1e-6))
            got, _ = kernels.launch_join_rows(x, None, None, False, False, 96, False, shift[:1, :1], scale[:1, :1],
                                              -1, 1e-6, wrap=False)
            ref_one = one.join()
            ulp = torch.finfo(dtype).eps * ref_one.float().abs().amax(-1, keepdim=True)
            print("broadcast", dtype, float(((got.float() - ref_one.float()).abs() / ulp).max()))
        q_ref, s_ref = quantize_activation_rows(ref.reshape(-1, 112))
        q, s = kernels.launch_join_rows(x, None, tail, False, False, 112, True, shift, scale, 7, 1e-6, wrap=False)
        q = q.reshape(-1, 112).float()
        # the interpreter's lost carry (a value rounding up to 2^k gives 2^(k-1): test_interpreter_quirk_...)
        carry = (torch.frexp(q).mantissa.abs() == 0.5) & ((2 * q - q_ref.float()).abs() < (q - q_ref.float()).abs())
        values, values_ref = torch.where(carry, 2 * q, q) * s, q_ref.float() * s_ref
        top = values_ref.abs().amax(-1, keepdim=True)
        print("fp8", float(((s - s_ref).abs() / s_ref).max()), float(((values - values_ref).abs() / top).max()))
    """)
    lines = {" ".join(line.split()[:-1]): float(line.split()[-1]) for line in out.strip().splitlines()
             if not line.startswith("fp8")}
    # in ulps at the row's largest value: fp32 summation order; bf16 the norm's and the modulation's roundings,
    # truncated by the interpreter
    assert lines["norm torch.float32"] < 8 and lines["broadcast torch.float32"] < 8
    assert lines["norm torch.bfloat16"] <= 4.01 and lines["broadcast torch.bfloat16"] <= 4.01
    fp8 = next(line for line in out.splitlines() if line.startswith("fp8")).split()
    # bf16 inputs one or two ulps apart (above) move a row's amax by ~1 % and a value by at most one e4m3 code:
    # 32 / 448 of the row's largest value at the top of the range (a wrong branch row would move values by O(1))
    assert float(fp8[1]) < 0.02 and float(fp8[2]) < 0.072


def test_concat_input_with_row_modulation_joins_like_layer_norm_then_adaln():
    torch.manual_seed(0)
    x, shift, scale = torch.randn(2, 6, 8), torch.randn(2, 2, 8), torch.randn(2, 2, 8)
    joined = kernels.ConcatInput((x,), (None,), norm=kernels.RowModulation(shift, scale, 4, 1e-6))
    normed = nn.functional.layer_norm(x, (8,), eps=1e-6)
    expected = torch.cat([normed[:, :4] * (1 + scale[:, :1]) + shift[:, :1],
                          normed[:, 4:] * (1 + scale[:, 1:2]) + shift[:, 1:2]], 1)
    torch.testing.assert_close(joined.join(), expected)
    torch.testing.assert_close(joined.rows(4), expected[:, 4:])  # the condition rows keep their branch
    torch.testing.assert_close(joined.rows(3), expected[:, 3:])
    tail = torch.randn(2, 2, 3)
    torch.testing.assert_close(joined.with_tail(tail).join()[:, :, :8], expected)  # the norm survives a tail


def test_qk_norm_rope_op_traces_with_fake_tensors():
    """What ``torch.compile`` sees: the op in the graph with the right output shapes, no kernel run."""
    from torch.fx.experimental.proxy_tensor import make_fx

    heads, dim, text, image = 2, 16, 3, 10
    q = [torch.randn(1, text, heads * dim).bfloat16(), torch.randn(1, image, 3 * heads * dim).bfloat16()[..., :32]]
    weights = [torch.ones(dim).bfloat16(), torch.ones(dim).bfloat16()]
    cos = sin = torch.ones(text + image, dim)

    def call(q0, q1, w0, w1, c, s):
        return torch.ops.appleswap.qk_norm_rope([q0, q1], [q0, q1], [w0, w1], [w0, w1], c, s, 1e-6, dim)

    graph = make_fx(call, tracing_mode="fake")(*q, *weights, cos, sin)
    assert "appleswap.qk_norm_rope" in graph.code
    fake_out = next(node for node in graph.graph.nodes if node.op == "output").args[0]
    assert [tuple(node.meta["val"].shape) for node in fake_out] == [(1, text + image, heads, dim)] * 2


def test_interpreter_quirk_is_the_interpreter_s():
    """The tolerance above rests on this: the interpreter alone can lose the carry into the next power of two
    (124.2 becomes e4m3 64 where torch gives 128)."""
    out = _interpreted("""
        import json
        import triton
        import triton.language as tl

        @triton.jit
        def cast(x_ptr, o_ptr, N: tl.constexpr):
            i = tl.arange(0, N)
            tl.store(o_ptr + i, tl.load(x_ptr + i).to(o_ptr.dtype.element_ty))

        x = torch.tensor([124.2, 119.0, 15.9, 250.0])
        o = torch.empty(4, dtype=torch.float8_e4m3fn)
        cast[(1,)](x, o, N=4)
        print(json.dumps([o.float().tolist(), x.to(torch.float8_e4m3fn).float().tolist()]))
    """)
    interpreted, torch_cast = json.loads(out.strip().splitlines()[-1])
    assert torch_cast == [128.0, 120.0, 16.0, 256.0]
    assert interpreted[1:] == torch_cast[1:] and interpreted[0] in (64.0, 128.0)


def test_join_rows_op_traces_with_fake_tensors():
    from torch.fx.experimental.proxy_tensor import make_fx

    a, b, tail = torch.randn(1, 6, 32).bfloat16(), torch.randn(1, 6, 64).bfloat16(), torch.randn(1, 2, 8).bfloat16()
    graph = make_fx(lambda a, b, t: torch.ops.appleswap.join_rows(a, b, t, False, True, 112, True),
                    tracing_mode="fake")(a, b, tail)
    values = [n.meta["val"] for n in next(n for n in graph.graph.nodes if n.op == "output").args[0]]
    assert (tuple(values[0].shape), values[0].dtype) == ((1, 6, 112), torch.float8_e4m3fn)
    assert tuple(values[1].shape) == (6, 1)


def test_join_rows_op_with_row_modulation_traces_with_fake_tensors():
    from torch.fx.experimental.proxy_tensor import make_fx

    x, mod, tail = torch.randn(2, 6, 32).bfloat16(), torch.randn(2, 2, 96).bfloat16(), torch.randn(2, 2, 8).bfloat16()
    shift, scale, _ = mod.chunk(3, dim=-1)
    graph = make_fx(lambda x, t, sh, sc: torch.ops.appleswap.join_rows(x, None, t, False, False, 48, True, sh, sc, 4,
                                                                       1e-6), tracing_mode="fake")(x, tail, shift, scale)
    values = [n.meta["val"] for n in next(n for n in graph.graph.nodes if n.op == "output").args[0]]
    assert (tuple(values[0].shape), values[0].dtype) == ((2, 6, 48), torch.float8_e4m3fn)
    assert tuple(values[1].shape) == (12, 1)


def test_concat_input_joins_like_torch_cat():
    torch.manual_seed(0)
    a, b, tail = torch.randn(2, 5, 4), torch.randn(2, 5, 6), torch.randn(2, 2, 3)
    x = kernels.ConcatInput((a, b), (None, "tanh"), tail)
    expected = torch.cat([a, torch.nn.functional.gelu(b, approximate="tanh"),
                          torch.cat([torch.zeros(2, 3, 3), tail], 1)], -1)
    torch.testing.assert_close(x.join(), expected)
    assert x.shape == (2, 5, 13) and x.join(16).shape == (2, 5, 16) and not x.join(16)[..., 13:].any()
    torch.testing.assert_close(x.rows(3), expected[:, 3:, :10])
    assert not kernels.join_applies(x, 16)  # CPU


def test_qk_norm_rope_uses_the_reference_where_the_kernel_does_not_apply():
    torch.manual_seed(0)
    heads, dim = 2, 16
    x = torch.randn(1, 7, heads * dim)
    norm = nn.RMSNorm(dim, eps=1e-6)
    rotary = (torch.ones(7, dim), torch.zeros(7, dim))
    got = kernels.qk_norm_rope([x], [x], [norm], [norm], rotary, dim)  # CPU: reference path
    expected = norm(x.unflatten(-1, (heads, dim)))
    torch.testing.assert_close(got[0], expected)
    assert not kernels._kernel_applies([x], [x], [norm, norm], rotary, dim)
    assert kernels._norm_eps(nn.LayerNorm(dim)) is None and kernels._norm_eps(nn.RMSNorm(dim)) is not None
    assert kernels._norm_eps(nn.RMSNorm(dim, elementwise_affine=False)) is None
