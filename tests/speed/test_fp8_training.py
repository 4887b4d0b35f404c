"""fp8 frozen base weights in training (``appleswap.speed.fp8_training``): the forward and the input gradient
against references computed here in float64 from the layer's e4m3 copies, and against the full-precision layer
within e4m3's rounding; the row-wise ``torch._scaled_mm`` path (it runs on this CPU build) taken for both products;
no gradient to the frozen weights while a PEFT LoRA around the fp8 base still trains; the block walk.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

import appleswap.speed.fp8_linear as fp8_lib
from appleswap.speed import fp8_training
from appleswap.speed.fp8_linear import FP8
from appleswap.speed.fp8_training import FrozenFp8Linear, quantize_frozen_fp8
from tests.fixtures.tiny_flux import build_tiny_transformer, one_thread  # noqa: F401

HALF_ULP = 2**-4  # e4m3 rounds a normal value to within 1/16 of itself
# e4m3 weights (and, on the fp8 GEMM path, e4m3 activations / output gradients): each element within 1/16, the
# errors of a 64-term dot product partly cancel; measured relative L2 errors 0.022-0.034 at these shapes
WEIGHT_ONLY_TOL, FP8_GEMM_TOL = 0.05, 0.07


def _frozen_linear(in_features: int = 64, out_features: int = 48, seed: int = 0) -> nn.Linear:
    """A frozen linear whose rows AND columns span two decades of magnitude: a scale taken from the wrong axis
    (the forward's per-output scales in the backward, say) is off by up to 100x somewhere."""
    generator = torch.Generator().manual_seed(seed)
    linear = nn.Linear(in_features, out_features)
    with torch.no_grad():
        rows = torch.logspace(0, 2, out_features)[torch.randperm(out_features, generator=generator)]
        columns = torch.logspace(0, 2, in_features)[torch.randperm(in_features, generator=generator)]
        linear.weight.copy_(torch.randn(out_features, in_features, generator=generator) * rows[:, None]
                            * columns[None, :] * 1e-3)
        linear.bias.copy_(torch.randn(out_features, generator=generator))
    return linear.requires_grad_(False)


def _relative_l2(value: torch.Tensor, reference: torch.Tensor) -> float:
    return float((value.double() - reference.double()).norm() / reference.double().norm())


def _forward_backward(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = layer(x)
    out.backward(grad)
    return out.detach(), x.grad


def test_the_two_e4m3_copies_round_w_and_its_transpose():
    """Each copy is W (or W^T) within half an e4m3 step of its own row's scale; both take the bf16 weight's bytes."""
    linear = _frozen_linear()
    layer = FrozenFp8Linear.from_linear(linear)
    weight = linear.weight.double()
    assert layer.weight_fp8.dtype == layer.weight_t_fp8.dtype == FP8
    assert layer.weight_fp8.shape == (48, 64) and layer.weight_t_fp8.shape == (64, 48)
    assert layer.weight_t_fp8.is_contiguous()  # so weight_t_fp8.t() is the column-major operand _scaled_mm wants
    forward = layer.weight_fp8.double() * layer.weight_scale.double()[:, None]
    backward = layer.weight_t_fp8.double() * layer.weight_t_scale.double()[:, None]
    row_max, column_max = weight.abs().amax(1, keepdim=True), weight.abs().amax(0)[:, None]
    assert ((forward - weight).abs() <= HALF_ULP * row_max).all()
    assert ((backward - weight.t()).abs() <= HALF_ULP * column_max).all()
    assert layer.weight_fp8.nbytes + layer.weight_t_fp8.nbytes == linear.weight.to(torch.bfloat16).nbytes
    assert not list(layer.parameters())  # buffers only: nothing an optimizer could pick up


def test_forward_and_input_gradient_equal_the_dequantised_products():
    """Dequantised path (CPU, fp32): y = x W8^T + b and dx = dy Wt8^T in float64 from the stored e4m3 copies and
    their scales; and both within e4m3's rounding of the full-precision layer."""
    linear = _frozen_linear()
    layer = FrozenFp8Linear.from_linear(linear)
    generator = torch.Generator().manual_seed(1)
    x, grad = torch.randn(2, 7, 64, generator=generator), torch.randn(2, 7, 48, generator=generator)
    out, grad_x = _forward_backward(layer, x, grad)

    forward = layer.weight_fp8.double() * layer.weight_scale.double()[:, None]  # (48, 64) ~ W
    backward = layer.weight_t_fp8.double() * layer.weight_t_scale.double()[:, None]  # (64, 48) ~ W^T
    torch.testing.assert_close(out.double(), x.double() @ forward.t() + linear.bias.double(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(grad_x.double(), grad.double() @ backward.t(), rtol=1e-5, atol=1e-5)

    exact_out, exact_grad = _forward_backward(linear, x, grad)
    assert _relative_l2(out, exact_out) < WEIGHT_ONLY_TOL
    assert _relative_l2(grad_x, exact_grad) < WEIGHT_ONLY_TOL


CUDA_FP8 = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(not CUDA_FP8, reason="no GPU with fp8 GEMMs"))]


@pytest.mark.parametrize("device", DEVICES)
def test_bf16_products_take_the_rowwise_scaled_mm(monkeypatch, device):
    """bf16 with >= 16 rows: forward and input gradient are row-wise ``torch._scaled_mm`` calls (operands and
    scales as Hopper wants them), within fp8 rounding of the float64 product of the dequantised copies. On a GPU
    with fp8 tensor cores the same test runs the real kernels (``pytest tests/speed -k scaled_mm``)."""
    if device == "cpu":
        monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)  # this CPU build runs _scaled_mm
    calls = []
    real = torch._scaled_mm

    def recording(a, b, **kwargs):
        calls.append((a.shape, b.shape, b.stride(), kwargs["scale_a"].shape, kwargs["scale_b"].shape))
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    linear = _frozen_linear().to(device, torch.bfloat16)
    layer = FrozenFp8Linear.from_linear(linear)
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 64, generator=generator).to(device, torch.bfloat16)
    grad = torch.randn(2, 16, 48, generator=generator).to(device, torch.bfloat16)
    try:
        out, grad_x = _forward_backward(layer, x, grad)
    except (RuntimeError, NotImplementedError) as error:  # a build without fp8 GEMMs on this device
        pytest.skip(f"torch._scaled_mm unavailable here: {error}")
    assert out.dtype == grad_x.dtype == torch.bfloat16
    # forward (32, 64) @ (64, 48); backward (32, 48) @ (48, 64); second operands column-major (stride (1, rows))
    assert calls == [((32, 64), (64, 48), (1, 64), (32, 1), (1, 48)),
                     ((32, 48), (48, 64), (1, 48), (32, 1), (1, 64))]
    forward = layer.weight_fp8.double() * layer.weight_scale.double()[:, None]
    backward = layer.weight_t_fp8.double() * layer.weight_t_scale.double()[:, None]
    reference_out = x.double().reshape(32, 64) @ forward.t() + linear.bias.double()
    reference_grad = grad.double().reshape(32, 48) @ backward.t()
    assert _relative_l2(out.reshape(32, 48), reference_out) < FP8_GEMM_TOL  # e4m3 activations only
    assert _relative_l2(grad_x.reshape(32, 64), reference_grad) < FP8_GEMM_TOL  # e4m3 output gradients only
    exact_out, exact_grad = _forward_backward(linear.double().cpu(), x.double().cpu(), grad.double().cpu())
    assert _relative_l2(out.cpu(), exact_out) < FP8_GEMM_TOL
    assert _relative_l2(grad_x.cpu(), exact_grad) < FP8_GEMM_TOL


@pytest.mark.parametrize("scaled", [True, False])
def test_without_the_transposed_copy_the_input_gradient_uses_the_forward_copy(monkeypatch, scaled):
    """``transposed_copy=False`` frees ``W^T``: the input gradient is ``(dy diag(s)) @ W_q`` from the forward's copy
    (the per-output-channel scales folded into dy), within fp8 rounding of the float64 product of that copy (the
    scaled path: one row-wise GEMM with unit weight scales) and of the exact gradient; the forward is unchanged."""
    monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: scaled)  # this CPU build runs _scaled_mm
    calls = []
    real = torch._scaled_mm

    def recording(a, b, **kwargs):
        calls.append((a.shape, b.shape, b.stride(), bool((kwargs["scale_b"] == 1).all())))
        return real(a, b, **kwargs)

    monkeypatch.setattr(torch, "_scaled_mm", recording)
    linear = _frozen_linear().to(torch.bfloat16)
    stored, lean = FrozenFp8Linear.from_linear(linear), FrozenFp8Linear.from_linear(linear)
    lean.drop_transposed_copy()
    assert lean.weight_t_fp8 is None and "weight_t_fp8" not in dict(lean.named_buffers())
    generator = torch.Generator().manual_seed(2)
    x = torch.randn(2, 16, 64, generator=generator).to(torch.bfloat16)
    grad = torch.randn(2, 16, 48, generator=generator).to(torch.bfloat16)
    out, grad_x = _forward_backward(lean, x, grad)
    lean_calls = list(calls)
    stored_out, _ = _forward_backward(stored, x, grad)
    torch.testing.assert_close(out, stored_out, rtol=0, atol=0)
    forward = lean.weight_fp8.double() * lean.weight_scale.double()[:, None]
    reference_grad = grad.double().reshape(32, 48) @ forward
    assert _relative_l2(grad_x.reshape(32, 64), reference_grad) < (FP8_GEMM_TOL if scaled else 1e-2)
    _, exact_grad = _forward_backward(linear.double(), x.double(), grad.double())
    assert _relative_l2(grad_x, exact_grad) < FP8_GEMM_TOL
    # the backward GEMM of a scaled run: (32, 48) @ (48, 64), the forward copy transposed, unit scales
    assert lean_calls[1:] == ([((32, 48), (48, 64), (1, 48), True)] if scaled else [])
    torch.testing.assert_close(lean.dequantized_weight_t(torch.float64), forward.t())
    direct = fp8_training.input_gradient_from_forward_copy(grad.reshape(32, 48), lean.weight_fp8, lean.weight_scale,
                                                           scaled)
    assert direct.dtype == torch.bfloat16  # dy's dtype, as autograd hands it back


def test_unaligned_sizes_fall_back_to_the_dequantised_matmul(monkeypatch):
    """Sizes that are not multiples of 16 never reach _scaled_mm (it would refuse them on a GPU)."""
    monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: pytest.fail("_scaled_mm called on unaligned sizes"))
    linear = _frozen_linear(40, 24).to(torch.bfloat16)
    layer = FrozenFp8Linear.from_linear(linear)
    x = torch.randn(32, 40).to(torch.bfloat16)
    out, grad_x = _forward_backward(layer, x, torch.ones(32, 24, dtype=torch.bfloat16))
    assert out.shape == (32, 24) and grad_x.shape == (32, 40)


def test_fewer_than_16_rows_fall_back_to_the_dequantised_matmul(monkeypatch):
    """A product with fewer than 16 rows (tokens) never reaches _scaled_mm, whatever its feature sizes."""
    monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)
    monkeypatch.setattr(torch, "_scaled_mm", lambda *a, **k: pytest.fail("_scaled_mm called with 8 rows"))
    layer = FrozenFp8Linear.from_linear(_frozen_linear().to(torch.bfloat16))
    out, grad_x = _forward_backward(layer, torch.randn(8, 64).to(torch.bfloat16),
                                    torch.ones(8, 48, dtype=torch.bfloat16))
    assert out.shape == (8, 48) and grad_x.shape == (8, 64)


def test_trainable_linears_are_refused():
    """A trainable weight or a trainable bias alone is refused; so are other scale granularities and a transposed
    copy of the wrong shape."""
    with pytest.raises(ValueError, match="fp8 base weights are for frozen layers"):
        FrozenFp8Linear.from_linear(nn.Linear(16, 16))
    weight_only = nn.Linear(16, 16)
    weight_only.bias.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen layers"):
        FrozenFp8Linear.from_linear(weight_only)
    bias_only = nn.Linear(16, 16)
    bias_only.weight.requires_grad_(False)
    with pytest.raises(ValueError, match="frozen layers"):
        FrozenFp8Linear.from_linear(bias_only)
    with pytest.raises(ValueError, match="row-wise scales only"):
        FrozenFp8Linear.from_linear(_frozen_linear(), granularity="tensor")
    layer = FrozenFp8Linear.from_linear(_frozen_linear())
    with pytest.raises(ValueError, match=r"transposed copy needs shape \(64, 48\) and 64 scales, got \(48, 64\)"):
        FrozenFp8Linear(layer.weight_fp8, layer.weight_scale, layer.weight_fp8, layer.weight_t_scale, None,
                        torch.bfloat16)


def test_layer_defaults_no_bias_and_the_stored_transposed_copy():
    """Defaults: fast accumulation in the forward, the weight's dtype for compute, the transposed copy kept (and
    read back dequantised in the compute dtype); a linear without bias works."""
    linear = nn.Linear(64, 48, bias=False).to(torch.bfloat16).requires_grad_(False)
    layer = FrozenFp8Linear.from_linear(linear)
    assert layer.fast_accum and layer.compute_dtype == torch.bfloat16 and layer.bias is None
    assert not FrozenFp8Linear.from_linear(linear, fast_accum=False).fast_accum
    copy = layer.dequantized_weight_t()
    assert copy.dtype == torch.bfloat16
    torch.testing.assert_close(layer.dequantized_weight_t(torch.float64),
                               layer.weight_t_fp8.double() * layer.weight_t_scale.double()[:, None])
    out, _ = _forward_backward(layer, torch.randn(32, 64).to(torch.bfloat16), torch.ones(32, 48, dtype=torch.bfloat16))
    assert out.shape == (32, 48)
    assert fp8_training.is_modulation("norm1.linear") and not fp8_training.is_modulation("proj.linear")
    assert not fp8_training.is_modulation("norm_out.proj")


def test_lora_around_the_fp8_base_trains_and_the_base_gets_no_gradient():
    """A PEFT LoRA wrapper with the fp8 base, routed as the blocks route it (LoRA on the condition rows only):
    lora_A / lora_B and the input get the gradients of the full-precision base within e4m3 rounding, and the
    fp8 base holds no parameter and no gradient."""
    from peft import LoraConfig, inject_adapter_in_model

    from appleswap.model.lora import routed_linear

    def wrapped(base: nn.Module) -> nn.Module:
        torch.manual_seed(3)
        holder = inject_adapter_in_model(LoraConfig(r=4, lora_alpha=4, target_modules=["proj"]),
                                         nn.ModuleDict({"proj": base}))
        layer = holder["proj"]
        nn.init.normal_(layer.lora_B["default"].weight, std=0.05)  # PEFT starts B at zero: make A's gradient non-zero
        return layer

    linear = _frozen_linear()
    reference = wrapped(linear)
    quantized = wrapped(linear)
    quantized.base_layer = FrozenFp8Linear.from_linear(linear)
    x = torch.randn(2, 10, 64, generator=torch.Generator().manual_seed(4))
    grad = torch.randn(2, 10, 48, generator=torch.Generator().manual_seed(5))
    results = []
    for layer in (reference, quantized):
        layer.requires_grad_(False)
        for module in (layer.lora_A, layer.lora_B):
            module.requires_grad_(True)
        inputs = x.clone().requires_grad_(True)
        routed_linear(layer, inputs, 6).backward(grad)
        results.append((inputs.grad, layer.lora_A["default"].weight.grad, layer.lora_B["default"].weight.grad))
    (x_ref, a_ref, b_ref), (x_fp8, a_fp8, b_fp8) = results
    assert a_fp8.abs().sum() > 0 and b_fp8.abs().sum() > 0
    for ours, theirs in ((x_fp8, x_ref), (a_fp8, a_ref), (b_fp8, b_ref)):
        assert _relative_l2(ours, theirs) < WEIGHT_ONLY_TOL
    # B's gradient depends on the LoRA input alone, never on the base: the same with either base
    torch.testing.assert_close(b_fp8, b_ref)
    base = quantized.base_layer
    assert not list(base.parameters())
    assert all(buffer.grad is None and not buffer.requires_grad for buffer in base.buffers())
    assert [name for name, p in quantized.named_parameters() if p.requires_grad] == [
        "lora_A.default.weight", "lora_B.default.weight"]


def test_quantize_frozen_fp8_replaces_the_block_linears_and_keeps_modulation_and_lora():
    """Every frozen block linear except the AdaLN ones becomes FrozenFp8Linear; inside a LoRA wrapper only the
    base layer; the LoRA matrices and everything outside the blocks keep their dtype."""
    from appleswap.model.lora import add_condition_lora, apple_target_modules

    flux = build_tiny_transformer(num_layers=1, num_single_layers=1)
    add_condition_lora(flux, apple_target_modules(1, 1), rank=4)
    flux.requires_grad_(False)
    linears = {name for name, module in flux.named_modules() if type(module) is nn.Linear}
    count = quantize_frozen_fp8(flux)
    replaced = {name for name, module in flux.named_modules() if isinstance(module, FrozenFp8Linear)}
    assert count == len(replaced) > 0
    kept = {name for name, module in flux.named_modules() if type(module) is nn.Linear}
    assert kept | replaced == linears and not kept & replaced
    for name in replaced:
        assert name.startswith(("transformer_blocks.", "single_transformer_blocks.")) and ".lora_" not in name
        assert not name.replace(".base_layer", "").endswith(("norm1.linear", "norm1_context.linear", "norm.linear"))
    # the wrapped targets: their base layer only (e.g. attn.to_q), the unwrapped ones in place (e.g. attn.add_q_proj)
    assert "transformer_blocks.0.attn.to_q.base_layer" in replaced
    assert "transformer_blocks.0.attn.add_q_proj" in replaced
    assert "transformer_blocks.0.norm1.linear.base_layer" in kept and "x_embedder.base_layer" in kept
    layers = [module for module in flux.modules() if isinstance(module, FrozenFp8Linear)]
    assert all(layer.weight_t_fp8 is not None and layer.fast_accum for layer in layers)  # the defaults
    assert all(".lora_" in name or not name.startswith(("transformer_blocks", "single"))
               or name.replace(".base_layer", "").endswith(".linear") for name in kept)


def test_quantize_frozen_fp8_options_and_an_apple_transformer():
    """An AppleTransformer is walked through its FLUX model; `fast_accum` and `transposed_copy` reach every layer;
    names already on DDP's ignore list stay on it."""
    from appleswap.model.transformer import AppleTransformer

    model = AppleTransformer(build_tiny_transformer(num_layers=1, num_single_layers=1)).requires_grad_(False)
    model._ddp_params_and_buffers_to_ignore = ["kept.name"]
    count = quantize_frozen_fp8(model, fast_accum=False, transposed_copy=False)
    layers = [module for module in model.modules() if isinstance(module, FrozenFp8Linear)]
    assert count == len(layers) == 17
    assert all(not layer.fast_accum and layer.weight_t_fp8 is None for layer in layers)
    ignored = set(model._ddp_params_and_buffers_to_ignore)
    assert "kept.name" in ignored and "flux.transformer_blocks.0.attn.to_q.weight_fp8" in ignored


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
def test_the_fp8_layer_compiles_in_one_graph_with_the_eager_gradients():
    """Under ``torch.compile(fullgraph=True)`` (as ``compile_blocks`` compiles the blocks) the autograd.Function
    traces without a graph break and gives the eager output and input gradient."""
    layer = FrozenFp8Linear.from_linear(_frozen_linear())
    x = torch.randn(3, 5, 64, generator=torch.Generator().manual_seed(6))
    grad = torch.randn(3, 5, 48, generator=torch.Generator().manual_seed(7))
    compiled = torch.compile(lambda inputs: torch.nn.functional.gelu(layer(inputs * 2)), fullgraph=True)
    inputs = x.clone().requires_grad_(True)
    out = compiled(inputs)
    out.backward(grad)
    reference_inputs = x.clone().requires_grad_(True)
    reference = torch.nn.functional.gelu(layer(reference_inputs * 2))
    reference.backward(grad)
    torch.testing.assert_close(out, reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(inputs.grad, reference_inputs.grad, rtol=1e-5, atol=1e-5)
    assert inputs.grad.abs().sum() > 0


def test_ddp_leaves_the_e4m3_copies_alone(tmp_path):
    """DDP would broadcast every buffer from rank 0 before each forward (the whole frozen model per step): the fp8
    copies, identical on every rank, are on its ignore list; the LoRA is what DDP reduces."""
    import torch.distributed as dist

    from appleswap.model.lora import add_condition_lora, apple_target_modules

    flux = build_tiny_transformer(num_layers=1, num_single_layers=1)
    add_condition_lora(flux, apple_target_modules(1, 1), rank=4)
    flux.requires_grad_(False)
    for name, param in flux.named_parameters():
        param.requires_grad_(".lora_" in name)
    quantize_frozen_fp8(flux)
    fp8_buffers = {name for name, buffer in flux.named_buffers() if buffer.dtype == FP8}
    assert fp8_buffers
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(flux)
        assert not fp8_buffers & set(ddp.named_module_buffers)
        assert not any(buffer.dtype == FP8 for buffer in ddp.modules_buffers)
        reduced = {name for name, param in flux.named_parameters() if param.requires_grad}
        assert reduced and all(".lora_" in name for name in reduced)
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not CUDA_FP8, reason="no GPU with fp8 GEMMs")
def test_the_fp8_layer_compiles_with_the_fp8_gemms_on_the_gpu():
    """GPU only: inductor's fp8 GEMMs in the compiled forward and backward give the eager ones' results."""
    layer = FrozenFp8Linear.from_linear(_frozen_linear().to("cuda", torch.bfloat16))
    generator = torch.Generator().manual_seed(8)
    x = torch.randn(4, 32, 64, generator=generator).to("cuda", torch.bfloat16)
    grad = torch.randn(4, 32, 48, generator=generator).to("cuda", torch.bfloat16)
    compiled = torch.compile(lambda inputs: torch.nn.functional.gelu(layer(inputs * 2)), fullgraph=True)
    results = []
    for function in (compiled, lambda inputs: torch.nn.functional.gelu(layer(inputs * 2))):
        inputs = x.clone().requires_grad_(True)
        function(inputs).backward(grad)
        results.append((function(x).float(), inputs.grad.float()))
    (out, grad_x), (eager_out, eager_grad) = results
    assert _relative_l2(out, eager_out) < 1e-2 and _relative_l2(grad_x, eager_grad) < 1e-2
