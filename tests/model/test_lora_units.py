"""The LoRA pieces around the routing: the target list, the file reader, rank checks, several / merged / dropout
adapters in ``lora_delta``, against expectations written out by hand."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig
from safetensors.torch import save_file

from appleswap.model import lora as lora_lib
from tests.fixtures.tiny_flux import build_tiny_transformer

RANK = 4


def test_apple_target_modules_spelled_out():
    assert lora_lib.apple_target_modules(2, 1) == [
        "x_embedder",
        "transformer_blocks.0.norm1.linear", "transformer_blocks.0.attn.to_q", "transformer_blocks.0.attn.to_k",
        "transformer_blocks.0.attn.to_v", "transformer_blocks.0.attn.to_out.0", "transformer_blocks.0.ff.net.2",
        "transformer_blocks.1.norm1.linear", "transformer_blocks.1.attn.to_q", "transformer_blocks.1.attn.to_k",
        "transformer_blocks.1.attn.to_v", "transformer_blocks.1.attn.to_out.0", "transformer_blocks.1.ff.net.2",
        "single_transformer_blocks.0.norm.linear", "single_transformer_blocks.0.proj_mlp",
        "single_transformer_blocks.0.proj_out", "single_transformer_blocks.0.attn.to_q",
        "single_transformer_blocks.0.attn.to_k", "single_transformer_blocks.0.attn.to_v"]
    assert len(lora_lib.apple_target_modules(19, 38)) == 1 + 19 * 6 + 38 * 6


def test_read_lora_file_normalises_the_three_key_spellings(tmp_path):
    a, b, c = torch.ones(RANK, 3), torch.full((5, RANK), 2.0), torch.full((RANK, 6), 3.0)
    save_file({"transformer.blocks.0.q.lora_A.weight": a, "blocks.0.q.lora_B.default.weight": b,
               "transformer.x_embedder.lora_A.default.weight": c}, str(tmp_path / "l.safetensors"))
    state = lora_lib.read_lora_file(tmp_path / "l.safetensors")
    assert sorted(state) == ["blocks.0.q.lora_A.weight", "blocks.0.q.lora_B.weight", "x_embedder.lora_A.weight"]
    assert torch.equal(state["blocks.0.q.lora_A.weight"], a) and torch.equal(state["blocks.0.q.lora_B.weight"], b)
    assert torch.equal(state["x_embedder.lora_A.weight"], c)


def test_read_lora_file_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        lora_lib.read_lora_file(tmp_path / "missing.safetensors")
    save_file({"transformer.blocks.0.q.weight": torch.ones(2)}, str(tmp_path / "base.safetensors"))
    with pytest.raises(ValueError, match=r"key 'transformer.blocks.0.q.weight' is not a LoRA weight \(expected "
                       r"'<module>.lora_A.weight' / 'lora_B', optionally prefixed 'transformer.'\)$"):
        lora_lib.read_lora_file(tmp_path / "base.safetensors")
    save_file({"blocks.0.q.lora_A.weightx": torch.ones(2)}, str(tmp_path / "suffix.safetensors"))
    with pytest.raises(ValueError, match="not a LoRA weight"):
        lora_lib.read_lora_file(tmp_path / "suffix.safetensors")
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(ValueError, match="no LoRA weights"):
        lora_lib.read_lora_file(tmp_path / "empty.safetensors")


def test_modules_and_rank_of_a_state():
    state = {"m1.lora_A.weight": torch.zeros(RANK, 8), "m1.lora_B.weight": torch.zeros(8, RANK),
             "m0.lora_A.weight": torch.zeros(RANK, 3), "m0.lora_B.weight": torch.zeros(5, RANK)}
    assert lora_lib.lora_modules_and_rank(state) == (["m0", "m1"], RANK)
    odd = {"gate.lora_up.lora_A.weight": torch.zeros(RANK, 3), "gate.lora_up.lora_B.weight": torch.zeros(3, RANK)}
    assert lora_lib.lora_modules_and_rank(odd) == (["gate.lora_up"], RANK)  # a module named '*.lora_*'
    with pytest.raises(ValueError, match=r"^LoRA: module\(s\) \['a', 'b', 'c'\] lack"):  # the default source; 3 named
        lora_lib.lora_modules_and_rank({f"{m}.lora_A.weight": torch.zeros(RANK, 3) for m in "abcd"})
    with pytest.raises(ValueError, match=r"f.safetensors: module\(s\) \['m0'\] lack"):
        lora_lib.lora_modules_and_rank({k: v for k, v in state.items() if k != "m0.lora_B.weight"}, "f.safetensors")
    with pytest.raises(ValueError, match=r"lack"):
        lora_lib.lora_modules_and_rank({k: v for k, v in state.items() if k != "m1.lora_A.weight"})
    with pytest.raises(ValueError, match=r"different ranks \[2, 4\]"):
        lora_lib.lora_modules_and_rank(state | {"m0.lora_A.weight": torch.zeros(2, 3),
                                                "m0.lora_B.weight": torch.zeros(5, 2)})


def _layer(dropout: float = 0.0):
    flux = build_tiny_transformer()
    lora_lib.add_condition_lora(flux, ["transformer_blocks.0.attn.to_q"], RANK, alpha=8.0, init=False,
                                dropout=dropout)
    layer = flux.transformer_blocks[0].attn.to_q
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for param in (layer.lora_A["default"].weight, layer.lora_B["default"].weight):
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return flux, layer


def _delta_by_hand(layer, name, x):
    down, up = layer.lora_A[name].weight, layer.lora_B[name].weight
    return layer.scaling[name] * (x @ down.T @ up.T)


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`:UserWarning")
@torch.no_grad()
def test_two_active_adapters_add_up():
    flux, layer = _layer()
    flux.add_adapter(LoraConfig(r=2, lora_alpha=6.0, init_lora_weights=False,
                                target_modules=["transformer_blocks.0.attn.to_q"]), adapter_name="second")
    layer.set_adapter(["default", "second"])
    x = torch.randn(2, 5, layer.in_features, generator=torch.Generator().manual_seed(1))
    expected = _delta_by_hand(layer, "default", x) + _delta_by_hand(layer, "second", x)
    assert layer.scaling["second"] == 3.0 and layer.scaling["default"] == 2.0
    torch.testing.assert_close(lora_lib.lora_delta(layer, x), expected, rtol=1e-5, atol=1e-5)
    layer.set_adapter(["second"])  # only active adapters count
    torch.testing.assert_close(lora_lib.lora_delta(layer, x), _delta_by_hand(layer, "second", x), rtol=1e-5,
                               atol=1e-5)


@torch.no_grad()
def test_merged_adapter_is_not_applied_twice():
    _, layer = _layer()
    x = torch.randn(1, 6, layer.in_features, generator=torch.Generator().manual_seed(2))
    weight, bias = layer.base_layer.weight.clone(), layer.base_layer.bias.clone()
    merged_by_hand = x @ weight.T + bias + _delta_by_hand(layer, "default", x)  # every row: the merge is global
    layer.merge()
    assert lora_lib.lora_delta(layer, x) is None
    torch.testing.assert_close(lora_lib.routed_linear(layer, x, 3), merged_by_hand, rtol=1e-5, atol=1e-5)


@torch.no_grad()
def test_dropout_acts_on_the_lora_input_in_training():
    _, layer = _layer(dropout=1.0)  # everything dropped while training: no delta at all
    x = torch.randn(1, 4, layer.in_features)
    layer.train()
    assert torch.count_nonzero(lora_lib.lora_delta(layer, x)) == 0
    layer.eval()
    torch.testing.assert_close(lora_lib.lora_delta(layer, x), _delta_by_hand(layer, "default", x), rtol=1e-5,
                               atol=1e-5)


@torch.no_grad()
def test_lora_runs_in_its_own_dtype():
    _, layer = _layer()
    layer.lora_A["default"].double()
    layer.lora_B["default"].double()
    x = torch.randn(1, 4, layer.in_features)
    delta = lora_lib.lora_delta(layer, x)
    assert delta.dtype == torch.float64
    torch.testing.assert_close(delta, _delta_by_hand(layer, "default", x.double()))
    routed = lora_lib.routed_linear(layer, x, 2)
    assert routed.dtype == torch.float32  # the delta is cast back to the output's dtype


def test_dora_is_refused():
    flux = build_tiny_transformer()
    flux.add_adapter(LoraConfig(r=2, use_dora=True, target_modules=["transformer_blocks.0.attn.to_q"]),
                     adapter_name="default")
    layer = flux.transformer_blocks[0].attn.to_q
    with pytest.raises(ValueError, match="DoRA"):
        lora_lib.lora_delta(layer, torch.randn(1, 3, layer.in_features))


class _MinimalLora(torch.nn.Module):
    """A LoRA layer with only the attributes every LoRA layer has (no disable_adapters / merged / use_dora flags,
    as in other PEFT versions or hand-made adapters): missing flags mean "off"."""

    def __init__(self):
        super().__init__()
        generator = torch.Generator().manual_seed(7)
        self.base_layer = torch.nn.Linear(6, 5)
        self.lora_A = torch.nn.ModuleDict({"default": torch.nn.Linear(6, 2, bias=False)})
        self.lora_B = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 5, bias=False)})
        self.lora_dropout = torch.nn.ModuleDict({"default": torch.nn.Identity()})
        self.scaling = {"default": 1.5}
        self.active_adapters = ["default"]
        with torch.no_grad():
            for linear in (self.lora_A["default"], self.lora_B["default"]):
                linear.weight.copy_(torch.randn(linear.weight.shape, generator=generator))


@torch.no_grad()
def test_layers_without_the_optional_flags_get_their_lora():
    layer = _MinimalLora()
    x = torch.randn(1, 4, 6)
    assert lora_lib.is_lora_layer(layer)
    torch.testing.assert_close(lora_lib.lora_delta(layer, x), _delta_by_hand(layer, "default", x))
    want = layer.base_layer(x) + _delta_by_hand(layer, "default", x) * (torch.arange(4) >= 1)[None, :, None]
    torch.testing.assert_close(lora_lib.routed_linear(layer, x, 1), want)
    half_made = torch.nn.Module()
    half_made.base_layer = torch.nn.Linear(6, 5)  # a wrapper without lora_A is not a LoRA layer
    assert not lora_lib.is_lora_layer(half_made)


def test_functional_path_keeps_the_output_dtype():
    _, layer = _layer()
    layer.lora_A["default"].double()
    layer.lora_B["default"].double()
    x = torch.randn(1, 4, layer.in_features)
    with torch.enable_grad():  # autograd: the concatenating path
        routed = lora_lib.routed_linear(layer, x, 2)
    assert routed.dtype == torch.float32
