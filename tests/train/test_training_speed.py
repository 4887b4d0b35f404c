"""Training speed options keep the function: each is compared with the plain step on a tiny model (CPU).

The plain step is the reference: every block recomputed in backward, target and condition encoded one call each,
the multi-tensor AdamW, eager blocks. Each option must give the same losses and gradients (or the same update).
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from appleswap.speed import compile_block_functions
from tests.fixtures.tiny_flux import make_tiny_weights, one_thread  # noqa: F401
from tests.train.tiny_run import tiny_config


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    root = tmp_path_factory.mktemp("speed_weights")
    make_tiny_weights(root / "w")
    return root


def _parts(weights, **overrides):
    from appleswap.train import build

    torch.manual_seed(0)
    config = tiny_config(weights, weights / "run", **{"id_loss_max_t": 1.0, "lpips_max_t": 1.0, **overrides})
    parts = build.build_parts(config, str(weights / "w"), torch.device("cpu"))
    with torch.no_grad():  # PEFT starts lora_B at zero; random B makes every LoRA matrix get a gradient
        for name, param in parts.transformer.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=torch.Generator().manual_seed(len(name))) * 0.05)
    return parts, config


def _gradients(parts, config, batch) -> tuple[float, dict[str, torch.Tensor]]:
    from appleswap.train.teacher import compute_loss

    parts.transformer.zero_grad(set_to_none=True)
    loss, _ = compute_loss(parts, batch, config)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in parts.transformer.named_parameters() if p.requires_grad}
    return loss.item(), grads


def _assert_same_step(loss, grads, loss_ref, ref, rel: float, rtol: float, atol: float) -> None:
    """The loss within ``rel`` and every LoRA gradient within (rtol, atol) of the reference step's."""
    assert loss == pytest.approx(loss_ref, rel=rel)
    for name, grad in ref.items():
        torch.testing.assert_close(grads[name], grad, rtol=rtol, atol=atol, msg=name)


def _batch():
    from appleswap.train.teacher import example_batch

    batch = example_batch(3, 64, 64, seed=5)
    batch["index"] = torch.tensor([3, 11, 42])  # t draws on both sides of the 0.35 gate for seed 0
    return batch


@pytest.mark.parametrize("fraction", [0.0, 0.5, 1.0])
def test_partial_checkpointing_gives_the_plain_gradients(weights, fraction):
    """Recomputing no, half or all blocks in backward changes memory and time, never the gradients."""
    plain, config = _parts(weights, gradient_checkpointing=False)
    loss_ref, ref = _gradients(plain, config, _batch())
    reached = sum(bool(g.abs().sum() > 0) for g in ref.values())
    assert reached > len(ref) // 2, f"only {reached} of {len(ref)} LoRA matrices get a gradient"

    parts, config = _parts(weights, gradient_checkpointing=True, checkpoint_fraction=fraction)
    blocks = len(parts.transformer.flux.transformer_blocks) + len(parts.transformer.flux.single_transformer_blocks)
    assert len(parts.transformer.checkpointed_blocks) == round(fraction * blocks)
    loss, grads = _gradients(parts, config, _batch())
    _assert_same_step(loss, grads, loss_ref, ref, rel=1e-6, rtol=1e-5, atol=1e-7)


def test_checkpoint_fraction_outside_0_1_is_refused(weights):
    parts, _ = _parts(weights)
    with pytest.raises(ValueError, match="fraction"):
        parts.transformer.enable_gradient_checkpointing(1.5)


def test_checkpointing_recomputes_exactly_the_chosen_blocks(weights):
    """A count of block calls: each checkpointed block runs twice (forward + recompute), the others once."""
    parts, config = _parts(weights, gradient_checkpointing=True, checkpoint_fraction=0.5)
    model = parts.transformer
    calls = {"double": 0, "single": 0}
    kernels = dict(model.block_functions)

    def counting(kind):
        def run(*args):
            calls[kind] += 1
            return kernels[kind](*args)
        return run

    model.block_functions = {**kernels, "double": counting("double"), "single": counting("single")}
    _gradients(parts, config, _batch())
    # tiny FLUX: 1 double + 1 single block; fraction 0.5 checkpoints block 0 (the double) only
    assert calls == {"double": 2, "single": 1}


def test_batched_vae_encode_equals_one_call_per_image_set(weights):
    """compute_loss encodes target and condition in one VAE call; each keeps its own posterior draw."""
    from appleswap.train.teacher import encode_posterior, sample_generator

    parts, config = _parts(weights)
    batch = _batch()
    indices = [int(i) for i in batch["index"]]
    separate = [encode_posterior(parts.vae, batch[key], [sample_generator(config.seed, 0, i, tag) for i in indices])
                for key, tag in (("target", "vae"), ("condition", "vae_condition"))]
    gens = [sample_generator(config.seed, 0, i, tag) for tag in ("vae", "vae_condition") for i in indices]
    joined = encode_posterior(parts.vae, torch.cat([batch["target"], batch["condition"]]), gens).chunk(2)
    for one, other in zip(separate, joined):
        torch.testing.assert_close(other, one, rtol=1e-5, atol=1e-5)
    # and the draws differ between target and condition (independent generators)
    assert not torch.allclose(joined[0], joined[1])


def test_fused_adamw_update_equals_the_multi_tensor_update():
    """make_optimizer's choice (fused on CUDA, multi-tensor elsewhere) changes kernels, not the update."""
    from appleswap.train.build import make_optimizer
    from appleswap.train.config import TrainConfig

    config = TrainConfig(learning_rate=1e-2, weight_decay=1e-3)
    generator = torch.Generator().manual_seed(0)
    start = [torch.randn(17, 5, generator=generator), torch.randn(9, generator=generator)]
    grads = [[torch.randn(p.shape, generator=generator) for p in start] for _ in range(3)]

    def run(make):
        params = [torch.nn.Parameter(p.clone()) for p in start]
        optimizer = make(params)
        for step in grads:
            for param, grad in zip(params, step):
                param.grad = grad.clone()
            optimizer.step()
        return params, optimizer

    chosen, optimizer = run(lambda ps: make_optimizer(ps, config))
    assert not optimizer.defaults.get("fused")  # CPU parameters: the multi-tensor path
    fused, _ = run(lambda ps: torch.optim.AdamW(ps, lr=1e-2, weight_decay=1e-3, fused=True))
    # AdamW by hand (decoupled decay, bias correction) as the independent reference
    params = [p.clone() for p in start]
    m = [torch.zeros_like(p) for p in params]
    v = [torch.zeros_like(p) for p in params]
    for t, step in enumerate(grads, start=1):
        for i, grad in enumerate(step):
            params[i] = params[i] * (1 - 1e-2 * 1e-3)
            m[i] = 0.9 * m[i] + 0.1 * grad
            v[i] = 0.999 * v[i] + 0.001 * grad * grad
            update = (m[i] / (1 - 0.9 ** t)) / ((v[i] / (1 - 0.999 ** t)).sqrt() + 1e-8)
            params[i] = params[i] - 1e-2 * update
    for ours, theirs, expected in zip(chosen, fused, params):
        torch.testing.assert_close(ours.detach(), expected, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(theirs.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
def test_compiled_training_blocks_give_the_eager_gradients(weights):
    """`compile: true` swaps the block functions for regional torch.compile ones: same loss and gradients."""
    eager, config = _parts(weights, gradient_checkpointing=True)
    loss_ref, ref = _gradients(eager, config, _batch())
    compiled, config = _parts(weights, gradient_checkpointing=True)
    compile_block_functions(compiled.transformer)
    assert all(fn is not plain for fn, plain in zip(compiled.transformer.block_functions.values(),
                                                    type(compiled.transformer).BLOCK_FUNCTIONS.values()))
    loss, grads = _gradients(compiled, dataclasses.replace(config), _batch())
    _assert_same_step(loss, grads, loss_ref, ref, rel=1e-4, rtol=1e-3, atol=1e-5)


def test_fp8_base_step_gives_lora_gradients_near_the_full_precision_step(weights):
    """`fp8_base: true` (frozen block linears in e4m3, dequantised on the CPU) changes numerics on purpose: the
    loss within 1e-3 and the LoRA gradients within e4m3's rounding of the full-precision step (measured: loss
    2e-5, all gradients together 0.034 relative L2, the worst single matrix 0.10)."""
    from appleswap.speed.fp8_training import FrozenFp8Linear

    plain, config = _parts(weights, gradient_checkpointing=True)
    loss_ref, ref = _gradients(plain, config, _batch())
    parts, config = _parts(weights, gradient_checkpointing=True, fp8_base=True)
    assert sum(isinstance(m, FrozenFp8Linear) for m in parts.transformer.modules()) == 17  # tiny FLUX: 1 + 1 blocks
    loss, grads = _gradients(parts, config, _batch())
    assert loss == pytest.approx(loss_ref, rel=1e-3)
    assert loss != loss_ref  # the fp8 weights are in use

    def relative(names):
        ours = torch.cat([grads[n].flatten() for n in names])
        theirs = torch.cat([ref[n].flatten() for n in names])
        return float((ours - theirs).norm() / theirs.norm())

    assert relative(list(ref)) < 0.08
    assert max(relative([name]) for name in ref if ref[name].norm() > 0) < 0.25


def test_training_with_fp8_base_lowers_the_loss_along_the_full_precision_curve(weights):
    """Short runs (the real training_step, AdamW on the LoRA, 40 steps on one batch, so the same noise and t each
    step) with and without the fp8 frozen base: the fp8 run's flow-matching loss falls by over 10 % and its curve
    stays within 1 % of the full-precision one at every step (measured: 0.1 % at most over 20 steps)."""
    from appleswap.train.build import make_optimizer
    from appleswap.train.teacher import training_step

    curves = []
    for fp8_base in (False, True):
        parts, config = _parts(weights, fp8_base=fp8_base, learning_rate=1e-2, lora_rank=16, lora_alpha=16.0)
        optimizer = make_optimizer([p for p in parts.transformer.parameters() if p.requires_grad], config)
        curves.append([training_step(parts, _batch(), config, optimizer)["loss/fm"] for _ in range(40)])
    full, fp8 = curves
    assert fp8[-1] < 0.9 * fp8[0], fp8
    assert max(abs(a - b) / b for a, b in zip(fp8, full)) < 0.01, (full, fp8)
    assert fp8 != full  # the fp8 weights are in use


@pytest.mark.slow  # inductor compiles both block kinds on the CPU: minutes on a shared 2-core box
@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
def test_fp8_base_composes_with_compiled_blocks(weights):
    """`fp8_base` + `compile`: the regional compile traces the fp8 layers' autograd.Function inside the block
    graphs (fullgraph) and gives the eager fp8 step's loss and gradients (measured: 1e-6 relative)."""
    eager, config = _parts(weights, gradient_checkpointing=True, fp8_base=True)
    loss_ref, ref = _gradients(eager, config, _batch())
    compiled, config = _parts(weights, gradient_checkpointing=True, fp8_base=True)
    compile_block_functions(compiled.transformer)
    loss, grads = _gradients(compiled, config, _batch())
    _assert_same_step(loss, grads, loss_ref, ref, rel=1e-4, rtol=1e-3, atol=1e-5)


def _aux_parts(weights, **overrides):
    """``_parts`` with both auxiliary losses on (a tiny random ArcFace and a random VGG16 trunk for LPIPS)."""
    import torchvision

    from appleswap.files import save_tensors
    from appleswap.train.arcface import ArcFaceResNet

    if not (weights / "vgg.safetensors").exists():
        torch.manual_seed(0)
        save_tensors(weights / "arc.safetensors", ArcFaceResNet((1, 1, 1, 1)).state_dict())
        vgg = torchvision.models.vgg16(weights=None).features.state_dict()
        save_tensors(weights / "vgg.safetensors", {f"features.{k}": v for k, v in vgg.items()})
    return _parts(weights, id_loss="arcface", arcface=str(weights / "arc.safetensors"),
                  vgg16=str(weights / "vgg.safetensors"), lpips_weight=1.0, **overrides)


def test_loss_weights_scale_their_terms_in_the_training_loss(weights):
    """The total the optimiser sees is fm + id_loss_weight * id + lpips_weight * lpips, with each term as logged
    (an ignored weight, e.g. id_loss_weight dropped on the training path, changes the total by the term)."""
    from appleswap.train.teacher import compute_loss

    parts, config = _aux_parts(weights)
    with torch.no_grad():
        _, logs = compute_loss(parts, _batch(), dataclasses.replace(config, id_loss_weight=1.0, lpips_weight=1.0))
        assert logs["loss/id"] > 0 and logs["loss/lpips"] > 0
        for id_w, lp_w in ((2.5, 1.0), (1.0, 0.25), (0.5, 3.0)):
            total, _ = compute_loss(parts, _batch(), dataclasses.replace(config, id_loss_weight=id_w, lpips_weight=lp_w))
            expected = logs["loss/fm"] + id_w * logs["loss/id"] + lp_w * logs["loss/lpips"]
            assert total.item() == pytest.approx(expected, rel=1e-5)


def _saved_bytes(parts, config, batch) -> int:
    """Bytes autograd keeps for backward during one forward + loss (what a memory budget trims)."""
    from appleswap.train.teacher import compute_loss

    saved = []

    def pack(tensor):
        saved.append(tensor.numel() * tensor.element_size())
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        loss, _ = compute_loss(parts, batch, config)
    del loss
    return sum(saved)


@pytest.mark.skipif(not hasattr(torch, "compile"), reason="torch.compile unavailable")
def test_memory_budget_keeps_less_for_backward_and_gives_the_eager_gradients(weights):
    """`activation_memory_budget`: the compiled blocks save a share of their activations and recompute the rest.
    Without whole-block checkpointing, a budget of 0.1 keeps less for backward than the compiled blocks with no
    budget, and the loss and gradients are the eager step's."""
    eager, config = _parts(weights, gradient_checkpointing=False)
    loss_ref, ref = _gradients(eager, config, _batch())
    kept = {}
    for budget in (None, 0.1):
        parts, config = _parts(weights, gradient_checkpointing=False)
        torch._dynamo.reset()  # the partitioner reads the budget when a graph compiles
        compile_block_functions(parts.transformer, memory_budget=budget)
        kept[budget] = _saved_bytes(parts, config, _batch())
        if budget is not None:
            loss, grads = _gradients(parts, config, _batch())
    torch._dynamo.reset()
    assert kept[0.1] < 0.9 * kept[None], kept
    _assert_same_step(loss, grads, loss_ref, ref, rel=1e-4, rtol=1e-3, atol=1e-5)


def test_memory_budget_outside_0_1_is_refused(weights):
    parts, _ = _parts(weights)
    with pytest.raises(ValueError, match="memory_budget"):
        compile_block_functions(parts.transformer, memory_budget=1.5)


def test_training_config_budget_reaches_the_compiled_blocks(weights, monkeypatch, caplog):
    """`compile: true` + `activation_memory_budget` on a GPU device compile the blocks with that budget (the CPU
    keeps eager blocks)."""
    from appleswap.train import build

    calls = []
    monkeypatch.setattr(build, "compile_block_functions", lambda model, **kw: calls.append(kw))
    parts, config = _parts(weights)
    config = dataclasses.replace(config, compile=True, activation_memory_budget=0.25, gradient_checkpointing=True)
    with caplog.at_level("WARNING", logger=build.log.name):
        build.apply_training_speed(parts.transformer, config, torch.device("cpu"))
    assert calls == [] and "no effect: it acts on compiled blocks" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=build.log.name):
        build.apply_training_speed(parts.transformer, dataclasses.replace(config, checkpoint_fraction=1.0),
                                   torch.device("cuda"))
    assert "set checkpoint_fraction below 1" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger=build.log.name):
        build.apply_training_speed(parts.transformer, dataclasses.replace(config, checkpoint_fraction=0.0),
                                   torch.device("cuda"))
    assert calls == [{"memory_budget": 0.25}] * 2 and caplog.text == ""


def test_fp8_base_without_the_transposed_copy_frees_it_and_keeps_the_step_close(weights):
    """`fp8_transposed_copy: false`: no layer keeps the backward's e4m3 W^T, and the step's loss and LoRA gradients
    stay within e4m3 rounding of the full-precision step, as with the copy."""
    from appleswap.speed.fp8_training import FrozenFp8Linear

    plain, config = _parts(weights, gradient_checkpointing=True)
    loss_ref, ref = _gradients(plain, config, _batch())
    parts, config = _parts(weights, gradient_checkpointing=True, fp8_base=True, fp8_transposed_copy=False)
    layers = [m for m in parts.transformer.modules() if isinstance(m, FrozenFp8Linear)]
    assert len(layers) == 17 and all(layer.weight_t_fp8 is None for layer in layers)
    loss, grads = _gradients(parts, config, _batch())
    assert loss == pytest.approx(loss_ref, rel=1e-3)
    ours = torch.cat([grads[n].flatten() for n in ref])
    theirs = torch.cat([ref[n].flatten() for n in ref])
    assert float((ours - theirs).norm() / theirs.norm()) < 0.08


def test_recomputed_aux_losses_give_the_batched_loss_and_gradients(weights):
    """`recompute_aux_losses: true` (decode + ID + LPIPS per gated sample, each in a checkpoint region) gives the
    batched path's logged terms, total loss and LoRA gradients, with every sample of the batch gated."""
    from appleswap.train.teacher import compute_loss

    results = {}
    for recompute in (False, True):
        parts, config = _aux_parts(weights, recompute_aux_losses=recompute)
        assert (config.id_loss_max_t, config.lpips_max_t) == (1.0, 1.0)  # all 3 samples gated
        with torch.no_grad():
            _, logs = compute_loss(parts, _batch(), config)
        assert logs["loss/id"] > 1e-3 and logs["loss/lpips"] > 1e-3, logs  # both terms in the compared total
        results[recompute] = (logs, *_gradients(parts, config, _batch()))
    (logs_ref, loss_ref, ref), (logs, loss, grads) = results[False], results[True]
    assert logs == pytest.approx(logs_ref, rel=1e-6)
    _assert_same_step(loss, grads, loss_ref, ref, rel=1e-6, rtol=1e-5, atol=1e-7)


def test_recomputed_aux_losses_keep_no_decoder_activations_for_backward(weights):
    """With every sample gated, the batched aux losses keep each sample's decoder/ArcFace/VGG activations for
    backward; `recompute_aux_losses` keeps only the checkpoint regions' inputs: far fewer saved bytes, and about
    what the step keeps with no sample gated (the saved bytes no longer grow with the gated samples). Measured on
    the tiny models: 309 MB batched, 11.2 MB recomputed, 10.5 MB with no sample gated."""
    kept = {}
    for name, overrides in (("batched", {}), ("recompute", {"recompute_aux_losses": True}),
                            ("none gated", {"id_loss_max_t": 0.0, "lpips_max_t": 0.0})):
        parts, config = _aux_parts(weights, **overrides)
        kept[name] = _saved_bytes(parts, config, _batch())
    assert kept["recompute"] < 0.7 * kept["batched"], kept
    assert kept["recompute"] - kept["none gated"] < 0.01 * (kept["batched"] - kept["none gated"]), kept


def test_recompute_aux_losses_is_a_flag_and_a_loss_setting():
    """The option reaches the CLI as `--recompute-aux-losses` (teacher and student) and LossSettings, which mirrors
    the loss fields of TrainConfig with the same defaults."""
    from appleswap.cli import build_parser
    from appleswap.train.config import TrainConfig
    from appleswap.train.teacher import LossSettings

    for stage in ("teacher", "student"):
        assert build_parser().parse_args(["train", stage, "--recompute-aux-losses"]).recompute_aux_losses is True
    config = TrainConfig()
    for field in dataclasses.fields(LossSettings):
        assert getattr(config, field.name) == field.default, field.name


def _gate_ts(config, batch) -> list[float]:
    """The t each sample of ``batch`` draws in compute_loss (keyed by seed, epoch 0 and its dataset index)."""
    from appleswap.train import losses
    from appleswap.train.teacher import sample_generator

    return [float(losses.sample_timesteps(1, mean=config.logit_mean, std=config.logit_std,
                                          generator=sample_generator(config.seed, 0, int(i)))[0])
            for i in batch["index"]]


def _spy_aux_networks(parts) -> dict:
    """Record what the ID network, LPIPS and the VAE decoder are given (the networks still run)."""
    seen = {"id": [], "lpips": [], "decoded": 0}
    id_net, lpips_net, decode = parts.id_loss, parts.lpips, parts.vae.decode

    def id_spy(images, source):
        out = id_net(images, source)
        seen["id"].append((images.detach().clone(), source.clone(), out.detach().clone()))
        return out

    def lpips_spy(images, real):
        seen["lpips"].append((images.detach().clone(), real.clone()))
        return lpips_net(images, real)

    def decode_spy(latents, *args, **kwargs):
        seen["decoded"] += latents.shape[0]
        return decode(latents, *args, **kwargs)

    parts.id_loss = id_spy if id_net is not None else None
    parts.lpips = lpips_spy if lpips_net is not None else None
    parts.vae.decode = decode_spy
    return seen


@pytest.mark.parametrize("recompute", [False, True])
def test_aux_losses_take_exactly_the_gated_samples_in_each_network_s_range(weights, recompute):
    """The samples with t <= the gate (inclusive: the gate set to one sample's own t takes it) are decoded once
    each; the ID network gets them in [0, 1] (clamped) with their source photos, LPIPS the decoded image in
    [-1, 1] space unclamped with the real target mapped to [-1, 1]; the logged ID loss is their mean."""
    from appleswap.train.teacher import compute_loss

    batch = _batch()
    parts, config = _aux_parts(weights, recompute_aux_losses=recompute)
    ts = _gate_ts(config, batch)
    gate = sorted(ts)[1]  # the middle sample's own t
    config = dataclasses.replace(config, id_loss_max_t=gate, lpips_max_t=gate)
    expected = [k for k, t in enumerate(ts) if t <= gate]
    assert len(expected) == 2
    with torch.no_grad():
        parts.vae.decoder.conv_out.weight.mul_(20)  # decoded values well outside [-1, 1]: the clamp matters
    seen = _spy_aux_networks(parts)
    _, logs = compute_loss(parts, batch, config)  # with grad: the recompute path runs per sample
    assert seen["decoded"] == len(expected)
    id_images, sources, per_id = (torch.cat(parts) for parts in zip(*seen["id"]))
    lpips_images, reals = (torch.cat(parts) for parts in zip(*seen["lpips"]))
    torch.testing.assert_close(sources, batch["source"][expected], rtol=0, atol=0)
    torch.testing.assert_close(reals, batch["target"][expected] * 2 - 1, rtol=0, atol=0)
    assert lpips_images.min() < -1 and lpips_images.max() > 1
    torch.testing.assert_close(id_images, ((lpips_images + 1) / 2).clamp(0, 1), rtol=0, atol=1e-6)
    assert logs["loss/id"] == pytest.approx(per_id.mean().item(), rel=1e-5)


@pytest.mark.parametrize("recompute", [False, True])
@pytest.mark.parametrize("case", ["id off", "lpips off", "no id network", "id gate wider", "lpips gate wider"])
def test_each_aux_loss_decodes_only_what_its_own_gate_and_weight_ask(weights, case, recompute):
    """A loss with weight 0 (or no network) is neither computed nor logged and its gate decodes nothing; the
    samples decoded are those under the wider gate of the losses that are on."""
    from appleswap.train.teacher import compute_loss

    batch = _batch()
    parts, config = _aux_parts(weights, recompute_aux_losses=recompute)
    gate = min(_gate_ts(config, batch))  # one sample at or under it
    settings, logged, decoded = {
        "id off": ({"id_loss_weight": 0.0, "id_loss_max_t": 1.0, "lpips_max_t": gate}, {"loss/lpips"}, 1),
        "lpips off": ({"lpips_weight": 0.0, "lpips_max_t": 1.0, "id_loss_max_t": gate}, {"loss/id"}, 1),
        "no id network": ({"id_loss_max_t": 1.0, "lpips_max_t": gate}, {"loss/lpips"}, 1),
        "id gate wider": ({"id_loss_max_t": 1.0, "lpips_max_t": gate}, {"loss/id", "loss/lpips"}, 3),
        "lpips gate wider": ({"lpips_max_t": 1.0, "id_loss_max_t": gate}, {"loss/id", "loss/lpips"}, 3),
    }[case]
    config = dataclasses.replace(config, **settings)
    if case == "no id network":
        parts.id_loss = None
    seen = _spy_aux_networks(parts)
    total, logs = compute_loss(parts, batch, config)
    total.backward()  # the recompute path's backward runs with one loss alone too
    assert {name for name in logs if name in ("loss/id", "loss/lpips")} == logged
    assert (len(seen["id"]) > 0) == ("loss/id" in logged) and (len(seen["lpips"]) > 0) == ("loss/lpips" in logged)
    assert seen["decoded"] == decoded * (2 if recompute else 1)  # recompute: once more in backward
