"""Speed and memory options of the generation core against the plain path (tiny fp32 models, CPU).

Once-per-swap condition modulation and in-place ID residuals must not change the function; sequential block
offload must be exact; fp8 weights (per row and per tensor) change numerics by a bounded amount and their
dequantised path is exact (the fp8 numerics themselves: test_fp8.py).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from appleswap.model import lora as lora_lib
from appleswap.model.latents import image_ids
from appleswap.model.loading import build_id_attentions_from_weights
from appleswap.model.transformer import AppleTransformer
from appleswap.speed.fp8_linear import Fp8Linear
from appleswap.speed.offload import BlockOffloader, ModelOffloader, check_tier
from appleswap.speed.transformer import FastAppleTransformer
from tests.fixtures.tiny_flux import (
    build_tiny_transformer,
    id_attention_state,
    lora_state,
    one_thread,  # noqa: F401
    tiny_id_tokens,
    tiny_text,
)

IDS = image_ids(64, 64, vae_scale=2)  # (256, 3)


def _full_model() -> FastAppleTransformer:
    """Tiny FLUX (2 double + 2 single blocks) with ID cross-attentions and a condition LoRA."""
    from peft import set_peft_model_state_dict

    flux = build_tiny_transformer(num_layers=2, num_single_layers=2)
    modules = {}
    for key, value in id_attention_state(flux).items():
        _, index, name = key.split(".", 2)
        modules.setdefault(int(index), {})[name] = value
    model = FastAppleTransformer(flux, build_id_attentions_from_weights(modules, flux))
    state = {k.removeprefix("transformer."): v for k, v in lora_state(flux).items()}
    names, rank = lora_lib.lora_modules_and_rank(state)
    lora_lib.add_condition_lora(flux, names, rank, init=False)
    set_peft_model_state_dict(flux, state, adapter_name="default")
    return model.eval()


def _inputs(batch=2, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {"latents": torch.randn(batch, 256, 64, generator=generator),
            "condition": torch.randn(batch, 256, 64, generator=generator), "text": tiny_text(1),
            "timestep": torch.tensor([0.7, 0.3][:batch]), "guidance": torch.tensor([1.0, 3.5][:batch]),
            "id_tokens": tiny_id_tokens(1), "img_ids": IDS}


def _call(model, inp, **kwargs):
    inp = dict(inp)
    return model(inp.pop("latents"), inp.pop("timestep"), **inp, **kwargs)


def _reference(model: AppleTransformer) -> AppleTransformer:
    """The reference forward over ``model``'s modules (shared): what every speed option must reproduce."""
    return AppleTransformer(model.flux, model.id_attentions).eval()


def _plain(model, inp, **kwargs):
    return _call(_reference(model), inp, **kwargs)


@torch.no_grad()
def test_condition_modulation_cache_equals_plain_path():
    model, inp = _full_model(), _inputs()
    plain = _plain(model, inp)
    modulation = model.condition_modulation(inp["text"])
    assert len(modulation.rows) == 4 and modulation.rows[0].shape == (1, 1, 6 * 32)
    fast = _call(model, inp, modulation=modulation)
    torch.testing.assert_close(fast, plain, rtol=1e-5, atol=1e-5)
    # constant across steps: reuse it at another timestep and latent
    other = dict(inp, latents=inp["latents"] * 0.5, timestep=inp["timestep"] * 0.2)
    torch.testing.assert_close(_call(model, other, modulation=modulation), _call(model, other), rtol=1e-5, atol=1e-5)
    # the rows carry the LoRA: scaling its B matrix changes them
    model.flux.transformer_blocks[0].norm1.linear.lora_B["default"].weight.mul_(3)
    assert not torch.allclose(model.condition_modulation(inp["text"]).rows[0], modulation.rows[0])


@torch.no_grad()
def test_timestep_modulation_table_equals_per_pass_modulation():
    """The main tokens' AdaLN rows precomputed for a whole schedule give the same passes (fused and compiled-free
    eager path, with and without the condition), and the wrong step's row gives a different pass."""
    model, inp = _full_model(), _inputs(batch=2)
    schedule = torch.tensor([1.0, 0.7, 0.3])
    table = model.timestep_modulation(schedule, inp["text"], guidance=3.5)
    assert table.rows.shape == (3, 2 * (6 * 32 + 6 * 32) + 2 * 3 * 32 + 2 * 32)
    same = dict(inp, timestep=torch.tensor([0.7, 0.7]), guidance=torch.tensor([3.5, 3.5]))
    modulation = model.condition_modulation(inp["text"])
    for kwargs in ({}, {"modulation": modulation}):
        plain = _call(model, same, **kwargs)
        torch.testing.assert_close(_call(model, same, timestep_modulation=table.step(1), **kwargs), plain,
                                   rtol=1e-5, atol=1e-5)
        assert not torch.allclose(_call(model, same, timestep_modulation=table.step(2), **kwargs), plain, atol=1e-3)
    no_cond = dict(same, condition=None)
    torch.testing.assert_close(_call(model, no_cond, timestep_modulation=table.step(1)), _call(model, no_cond),
                               rtol=1e-5, atol=1e-5)
    model.fuse_projections()
    torch.testing.assert_close(_call(model, same, timestep_modulation=table.step(1)), _call(model, same),
                               rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="one step"):
        _call(model, same, timestep_modulation=table)


@torch.no_grad()
def test_step_table_joined_with_condition_rows_gives_the_same_passes(monkeypatch):
    """The condition's AdaLN rows beside each step's image-stream rows: each block reads [main; condition] as one
    view of the step's row (no concatenation); the passes equal the separate rows' (with the condition, without it,
    fused), and a joined table built from another prompt's condition rows changes them."""
    from appleswap.speed import blocks

    model, inp = _full_model(), _inputs(batch=2)
    table = model.timestep_modulation(torch.tensor([1.0, 0.7, 0.3]), inp["text"], guidance=3.5)
    modulation = model.condition_modulation(inp["text"])
    joined = model.joined_modulation(table, modulation)
    assert joined.with_condition and joined.rows.shape == (3, table.rows.shape[1] + (2 * 6 * 32 + 2 * 3 * 32))
    assert model.joined_modulation(joined, modulation) is joined
    same = dict(inp, timestep=torch.tensor([0.7, 0.7]), guidance=torch.tensor([3.5, 3.5]))
    rows_joined, cat = [], torch.cat  # concatenations of one-token rows: the per-block [main; condition] rows
    monkeypatch.setattr(blocks.torch, "cat", lambda pieces, *a, **k: rows_joined.append(
        all(p.shape[1] == 1 for p in pieces)) or cat(pieces, *a, **k))
    separate = _call(model, same, modulation=modulation, timestep_modulation=table.step(1))
    assert rows_joined.count(True) == 4  # one per block
    rows_joined.clear()
    together = _call(model, same, modulation=modulation, timestep_modulation=joined.step(1))
    monkeypatch.undo()
    torch.testing.assert_close(together, separate, rtol=1e-5, atol=1e-5)
    assert rows_joined.count(True) == 0
    no_cond = dict(same, condition=None)
    torch.testing.assert_close(_call(model, no_cond, timestep_modulation=joined.step(1)),
                               _call(model, no_cond, timestep_modulation=table.step(1)), rtol=1e-5, atol=1e-5)
    other = model.condition_modulation(tiny_text(1, seed=3))
    changed = _call(model, same, modulation=modulation, timestep_modulation=model.joined_modulation(table, other).step(1))
    assert not torch.allclose(changed, separate, atol=1e-3)
    model.fuse_projections()
    torch.testing.assert_close(_call(model, same, modulation=modulation, timestep_modulation=joined.step(1)),
                               separate, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_pass_constants_equal_per_pass_computation():
    """The prompt embedding, RoPE and ID keys/values computed once per swap give the same passes (with and without
    the condition, one ID for the batch or one per image, fused too); they are what the pass uses (another
    identity's keys change it) and a mismatched token count is refused."""
    model, inp = _full_model(), _inputs(batch=2)
    ids = torch.cat([inp["id_tokens"], tiny_id_tokens(1, seed=5)])
    for condition in (inp["condition"], None):
        for id_tokens in (inp["id_tokens"], ids):
            case = dict(inp, condition=condition, id_tokens=id_tokens)
            plain = _call(model, case)
            constants = model.pass_constants(inp["text"], IDS, id_tokens, condition is not None)
            assert len(constants.id_keys_values) == len(model.id_attentions) == 2
            assert constants.id_keys_values[0].shape[0] == id_tokens.shape[0]
            torch.testing.assert_close(_call(model, dict(case, id_tokens=None), constants=constants), plain,
                                       rtol=1e-5, atol=1e-5)
    constants = model.pass_constants(inp["text"], IDS, ids)
    other = model.pass_constants(inp["text"], IDS, ids.flip(0))
    fast = _call(model, dict(inp, id_tokens=None), constants=constants)
    assert (fast - _call(model, dict(inp, id_tokens=None), constants=other)).abs().max() > 1e-4
    model.fuse_projections()
    torch.testing.assert_close(_call(model, dict(inp, id_tokens=None), constants=constants),
                               _call(model, dict(inp, id_tokens=ids)), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="not both"):
        _call(model, inp, constants=constants)
    with pytest.raises(ValueError, match="built for"):
        _call(model, dict(inp, id_tokens=None), constants=model.pass_constants(inp["text"], IDS, ids, False))


def test_in_place_id_residual_equals_training_path(monkeypatch):
    """Inference adds the ID residuals in place and runs the last single block's queries, MLP and proj_out on the
    image rows alone; training runs every row. Same output."""
    from appleswap.speed import blocks

    model, inp = _full_model(), _inputs()
    queries, attention = [], blocks.joint_attention
    monkeypatch.setattr(blocks, "joint_attention", lambda q, *a, **k: queries.append(q.shape[1]) or attention(q, *a, **k))
    with torch.no_grad():
        inference = _call(model, inp)
    with torch.enable_grad():
        training = _call(model, inp)
    rows = 8 + 256 + 256  # text + image + condition tokens; 4 blocks per pass, the last one on image rows alone
    assert queries == [rows, rows, rows, 256] + [rows] * 4
    torch.testing.assert_close(inference, training.detach(), rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        assert (_call(model, inp, id_weight=0.0) - inference).abs().max() > 1e-4  # the ID path is active


@torch.no_grad()
def test_sequential_offload_is_exact_and_loads_in_order():
    model, inp = _full_model(), _inputs()
    plain = _plain(model, inp)
    before = _call(model, inp)  # the fast forward before offloading: offloaded it must give exactly this
    model.enable_sequential_offload("cpu")
    offloader = model.offloader
    assert isinstance(offloader, BlockOffloader)
    out = _call(model, inp, modulation=model.condition_modulation(inp["text"]))
    assert offloader.loads[-4:] == [0, 1, 2, 3]  # one load per block per pass, doubles first
    torch.testing.assert_close(out, plain, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(_call(model, inp), before, rtol=0, atol=0)  # blocks copied in: bit-identical
    cache = model.build_condition_cache(inp["condition"], inp["text"], IDS)
    assert len(cache.keys_values) == 4
    model.disable_sequential_offload()
    assert model.offloader is None
    torch.testing.assert_close(_call(model, inp), before, rtol=0, atol=0)
    with pytest.raises(ValueError, match="offload must be one of"):
        check_tier("disk")


def test_model_offloader_moves_module_only_while_used():
    module = nn.Linear(4, 4).to("meta")
    offloader = ModelOffloader("meta", home="meta")
    with offloader.use(module) as inside:
        assert inside is module and offloader.moves == ["in"]
    assert offloader.moves == ["in", "out"]
    layer = nn.Linear(4, 4)
    x = torch.randn(2, 4)
    with ModelOffloader("cpu").use(layer):
        inside = layer(x)
    torch.testing.assert_close(layer(x), inside, rtol=0, atol=0)
    assert layer.weight.device.type == "cpu"
    with offloader.use(None) as nothing:
        assert nothing is None


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_transformer_close_to_full_precision_and_keeps_lora(granularity):
    model, inp = _full_model(), _inputs()
    reference = _call(model, inp)
    lora_before = [p.clone() for p in model.lora_parameters()]
    count = model.quantize_fp8(granularity=granularity)
    blocks = list(model.flux.transformer_blocks) + list(model.flux.single_transformer_blocks)
    assert count == sum(isinstance(m, Fp8Linear) for b in blocks for m in b.modules()) > 0
    q_layer = model.flux.transformer_blocks[0].attn.to_q
    assert lora_lib.is_lora_layer(q_layer) and isinstance(q_layer.base_layer, Fp8Linear)
    assert q_layer.base_layer.granularity == granularity
    assert type(model.flux.transformer_blocks[0].norm1.linear.base_layer) is nn.Linear  # AdaLN kept by default
    assert all(torch.equal(a, b) for a, b in zip(lora_before, model.lora_parameters()))
    assert model.dtype == torch.float32  # embedders still report the model dtype
    fp8 = _call(model, inp)
    error = (fp8 - reference).norm() / reference.norm()
    assert 0 < error < 0.1, error
    # the dequantised weights in plain nn.Linear layers give the same function (weight-only fp8 on CPU)
    torch.testing.assert_close(_call(model, inp, modulation=model.condition_modulation(inp["text"])), fp8,
                               rtol=1e-5, atol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("granularity", ["row", "tensor"])
def test_fp8_scaled_mm_path_through_the_whole_model(monkeypatch, granularity):
    """The GPU code path (activations quantised per call, ``torch._scaled_mm``) run on the CPU in bf16."""
    import appleswap.speed.fp8_linear as fp8_lib

    model, inp = _full_model(), _inputs()
    model.flux.to(torch.bfloat16)
    model.id_attentions.to(torch.bfloat16)
    model.quantize_fp8(granularity=granularity)
    inp = {k: v.to(torch.bfloat16) if isinstance(v, torch.Tensor) and v.is_floating_point() else v
           for k, v in inp.items()}
    inp["text"] = inp["text"].to(dtype=torch.bfloat16)
    weight_only = _call(model, inp).float()
    calls = []
    original = fp8_lib.scaled_matmul
    monkeypatch.setattr(fp8_lib, "scaled_mm_supported", lambda device: True)
    monkeypatch.setattr(fp8_lib, "scaled_matmul", lambda *a: calls.append(1) or original(*a))
    try:
        fast = _call(model, inp).float()
    except (RuntimeError, NotImplementedError) as error:
        pytest.skip(f"torch._scaled_mm unavailable here: {error}")
    assert len(calls) > 10  # the projections took the fp8 GEMM; the AdaLN linears (1-2 rows) did not
    error = (fast - weight_only).norm() / weight_only.norm()
    assert 0 < error < 0.1, error


def test_modulation_state_follows_weights_adapters_and_switches():
    """The key that caches the AdaLN rows changes with an in-place weight change, a new LoRA adapter (its layers
    listed anew), another adapter's weights and the adapters' switches; it stays put otherwise."""
    from peft import LoraConfig

    flux = build_tiny_transformer(num_layers=2, num_single_layers=2)
    model = FastAppleTransformer(flux)
    first = model.modulation_state()
    assert model.modulation_state() == first
    with torch.no_grad():
        flux.single_transformer_blocks[1].norm.linear.weight.mul_(2)  # in place: same storage, new version
    changed = model.modulation_state()
    assert changed != first
    lora_lib.add_condition_lora(flux, lora_lib.apple_target_modules(2, 2), 4)
    with_lora = model.modulation_state()
    assert len(with_lora[0]) > len(changed[0]) and with_lora[1]
    flux.add_adapter(LoraConfig(r=2, target_modules=["norm.linear"]), adapter_name="second")
    flux.set_adapter("second")
    second = model.modulation_state()
    assert len(second[0]) > len(with_lora[0]) and second[1] != with_lora[1]
    with torch.no_grad():
        flux.single_transformer_blocks[0].norm.linear.lora_B["second"].weight.add_(1)
    assert model.modulation_state()[0] != second[0]
    flux.disable_adapters()
    assert model.modulation_state()[1] != second[1]
