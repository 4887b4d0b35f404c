"""SwapPipeline on a tiny weights folder: modes, inversion, guidance batching, sources, determinism."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from appleswap.identity.store import save_identity
from appleswap.model.latents import image_ids
from appleswap.pipeline import SwapPipeline
from appleswap.sampling import get_schedule, invert, sample_euler, with_id_guidance, with_image_guidance
from tests.fixtures.tiny_flux import make_tiny_weights, one_thread, tiny_id_tokens  # noqa: F401


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


@pytest.fixture(scope="module")
def student(weights):
    return SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def faces():
    rng = np.random.default_rng(0)
    return (rng.random((2, 64, 64, 3)) * 255).astype(np.uint8)


def test_student_swap_is_seeded_and_uses_the_identity(student, faces, tmp_path):
    ids = tiny_id_tokens(1)
    first = student(ids, faces[0], num_steps=3)
    assert first.shape == (1, 64, 64, 3) and first.dtype == np.uint8
    np.testing.assert_array_equal(student(ids, faces[0], num_steps=3), first)
    assert not np.array_equal(student(ids, faces[0], num_steps=3, seed=1), first)
    assert not np.array_equal(student(tiny_id_tokens(1, seed=9), faces[0], num_steps=3), first)
    path = save_identity(tmp_path / "alice.safetensors", ids)
    np.testing.assert_array_equal(student(path, faces[0], num_steps=3), first)  # identity file == tokens


def test_batch_equals_one_by_one(student, faces):
    ids = tiny_id_tokens(2)
    both = student(ids, list(faces), num_steps=2, seed=[0, 1], output_type="pt")
    one = student(ids[1:], faces[1], num_steps=2, seed=1, output_type="pt")
    torch.testing.assert_close(both[1:], one, rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="seed"):
        student(ids, list(faces), seed=[0, 1, 2])


def test_batched_guidance_equals_separate_passes(student, faces):
    cond = student.encode_latents(torch.from_numpy(faces[:1]).permute(0, 3, 1, 2) / 255.0, True, [0])
    black = student.encode_latents(torch.zeros(1, 3, 64, 64), False, [0])
    ids = tiny_id_tokens(1)
    pos = image_ids(64, 64, vae_scale=2)
    batched = student.denoiser(cond, ids, pos, image_guidance_scale=2.0, id_guidance_scale=1.5, black=black)
    full = student.denoiser(cond, ids, pos)
    no_image = student.denoiser(black, ids, pos)
    no_id = student.denoiser(cond, student.null_id, pos)
    x, sigma = torch.randn(1, 256, 64), torch.tensor([0.6])
    v, vb, vn = full(x, sigma), no_image(x, sigma), no_id(x, sigma)
    torch.testing.assert_close(batched(x, sigma), v + 1.0 * (v - vb) + 0.5 * (v - vn), rtol=1e-4, atol=1e-5)
    only_image = with_image_guidance(full, no_image, 2.0)
    torch.testing.assert_close(student.denoiser(cond, ids, pos, image_guidance_scale=2.0, black=black)(x, sigma),
                               only_image(x, sigma), rtol=1e-4, atol=1e-5)
    only_id = with_id_guidance(full, no_id, 1.5)
    torch.testing.assert_close(student.denoiser(cond, ids, pos, id_guidance_scale=1.5)(x, sigma),
                               only_id(x, sigma), rtol=1e-4, atol=1e-5)


def test_inversion_then_regeneration_with_same_conditions_reconstructs(student, faces):
    target = torch.from_numpy(faces[:1]).permute(0, 3, 1, 2) / 255.0
    x0 = student.encode_latents(target, False, [0])
    cond = student.encode_latents(target, True, [0])
    model = student.denoiser(cond, student.null_id, image_ids(64, 64, vae_scale=2))
    errors = []
    for steps in (3, 12):
        sigmas = get_schedule(steps, 256)
        noise = invert(model, x0, sigmas, disable=True)
        errors.append(float((sample_euler(model, noise, sigmas, disable=True) - x0).abs().mean()))
    assert errors[1] < errors[0] / 2 and errors[1] < 0.1 * float(x0.abs().mean())
    assert float((noise - x0).abs().mean()) > 10 * errors[1]  # the inverted latent really is far from x0


def test_teacher_needs_condition_and_runs_every_inversion_mode(weights, faces):
    teacher = SwapPipeline.from_pretrained(weights, "teacher", dtype=torch.float32, device="cpu")
    ids = tiny_id_tokens(1)
    with pytest.raises(ValueError, match="condition"):
        teacher(ids, faces[0], num_steps=2)
    outputs = {}
    for cond in ("noID_trgCond", "noID_noCond", "trgID_noCond", "trgID_trgCond"):
        outputs[cond] = teacher(ids, faces[0], condition=faces[1], invert=True, num_steps=2, inverse_cond=cond,
                                target_id=tiny_id_tokens(1, seed=7))
    assert len({o.tobytes() for o in outputs.values()}) == 4
    partial = teacher(ids, faces[0], condition=faces[1], invert=True, num_steps=4, inverse_steps=2)
    parity = teacher(ids, faces[0], condition=faces[1], invert=True, num_steps=2, inversion_order=2,
                     parity_wrong_midpoint=True)
    assert partial.shape == parity.shape == (1, 64, 64, 3)
    with pytest.raises(ValueError, match="inverse_cond"):
        teacher(ids, faces[0], condition=faces[1], invert=True, inverse_cond="bogus")


def test_missing_weights_name_the_file(tmp_path):
    from appleswap.weights import MissingWeightError

    with pytest.raises(MissingWeightError, match="flux"):
        SwapPipeline.from_pretrained(tmp_path, "student", device="cpu")
    with pytest.raises(ValueError, match="mode"):
        SwapPipeline.from_pretrained(tmp_path, "pupil", device="cpu")


def test_kv_cache_mode_matches_independent_condition(student, faces):
    target = torch.from_numpy(faces[:1]).permute(0, 3, 1, 2) / 255.0
    cond = student.encode_latents(target, True, [0])
    pos, ids = image_ids(64, 64, vae_scale=2), tiny_id_tokens(1)
    x, sigma = torch.randn(1, 256, 64), torch.tensor([0.4])
    cached = student.denoiser(cond, ids, pos, kv_cache=True)(x, sigma)
    masked = student.transformer(x, sigma, text=student.text, img_ids=pos, condition=cond, id_tokens=ids,
                                 guidance=torch.ones(1), independent_condition=True)
    torch.testing.assert_close(cached, masked, rtol=1e-5, atol=1e-5)
    swapped = student(ids, faces[0], num_steps=2, kv_cache=True)
    assert swapped.shape == (1, 64, 64, 3) and not np.array_equal(swapped, student(ids, faces[0], num_steps=2))


def test_photo_source_goes_through_the_identity_encoder(tmp_path, faces_dir, faces):
    import cv2

    from appleswap.files import load_image
    from tests.fixtures.tiny_identity import make_tiny_identity_weights

    root = make_tiny_identity_weights(make_tiny_weights(tmp_path / "weights"))  # pulid_encoder.* merged in
    pipe = SwapPipeline.from_pretrained(root, "student", dtype=torch.float32, device="cpu", vit_tokens=17)
    photos = {}
    for name in ("obama.jpg", "biden2.jpg"):
        image = load_image(faces_dir / name)
        scale = 320 / max(image.shape[:2])
        photos[name] = cv2.resize(image, (int(image.shape[1] * scale), int(image.shape[0] * scale)))
    obama = pipe(photos["obama.jpg"], faces[0], num_steps=2)
    tokens = pipe.identity_encoder.encode_identity([photos["obama.jpg"]])
    np.testing.assert_array_equal(pipe(tokens, faces[0], num_steps=2), obama)  # photo == its tokens
    assert not np.array_equal(pipe(photos["biden2.jpg"], faces[0], num_steps=2), obama)
    torch.testing.assert_close(pipe.null_id, pipe.identity_encoder.null_tokens().float())  # same uncond ID


def test_memory_tiers_give_the_same_swap(weights, student, faces):
    """offload="model" / "sequential" move weights between host and device; the swap must not change."""
    from appleswap.speed.offload import BlockOffloader

    ids = tiny_id_tokens(1)
    reference = student(ids, faces[0], num_steps=2, output_type="pt")
    for tier in ("model", "sequential"):
        pipe = SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu", offload=tier)
        sequential = isinstance(pipe.transformer.offloader, BlockOffloader)
        assert pipe.offload == tier and sequential == (tier == "sequential")
        torch.testing.assert_close(pipe(ids, faces[0], num_steps=2, output_type="pt"), reference, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="offload must be one of"):
        SwapPipeline.from_pretrained(weights, "student", device="cpu", offload="disk")


def test_condition_and_timestep_rows_are_computed_once_per_job(weights, faces, monkeypatch):
    pipe = SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu")
    calls = []
    for name in ("condition_modulation", "timestep_modulation"):
        original = getattr(pipe.transformer, name)
        monkeypatch.setattr(pipe.transformer, name, lambda *a, _f=original, _n=name, **k: calls.append(_n) or _f(*a, **k))
    ids = tiny_id_tokens(1)
    first = pipe(ids, faces[0], num_steps=3, output_type="pt")
    assert sorted(calls) == ["condition_modulation", "timestep_modulation"]  # once for the swap, not per step
    torch.testing.assert_close(pipe(ids, faces[1], num_steps=3, output_type="pt"),
                               pipe(ids, faces[1], num_steps=3, output_type="pt"))
    assert len(calls) == 2  # the next swaps with the same prompt, schedule and weights reuse them
    pipe(ids, faces[0], num_steps=4)
    assert calls.count("timestep_modulation") == 2  # another schedule
    # a LoRA changed in place (e.g. between training steps) changes the rows: computed anew, and the swap follows
    pipe.transformer.flux.transformer_blocks[0].norm1.linear.lora_B["default"].weight.mul_(5)
    changed = pipe(ids, faces[0], num_steps=3, output_type="pt")
    assert calls.count("condition_modulation") == 2 and not torch.allclose(changed, first, atol=1e-4)


def test_swap_builds_pass_constants_once_and_avoids_diffusers_module_walks(weights, faces, monkeypatch):
    """A swap computes the prompt embedding, RoPE and ID keys/values once (not per step) and never asks diffusers'
    ``ModelMixin`` for ``.dtype`` / ``.device``, which walk every submodule (~10 ms of host time each at FLUX size,
    with the GPU waiting at the start of a swap)."""
    from diffusers.models.modeling_utils import ModelMixin

    pipe = SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu")
    ids = tiny_id_tokens(1)
    reference = pipe(ids, faces[0], num_steps=3, output_type="pt")
    calls = []
    original = pipe.transformer.pass_constants
    monkeypatch.setattr(pipe.transformer, "pass_constants", lambda *a, **k: calls.append(1) or original(*a, **k))

    def walk(self):
        raise AssertionError(f"{type(self).__name__}: diffusers' module walk in a swap")

    monkeypatch.setattr(ModelMixin, "dtype", property(walk))
    monkeypatch.setattr(ModelMixin, "device", property(walk))
    torch.testing.assert_close(pipe(ids, faces[0], num_steps=3, output_type="pt"), reference)
    assert len(calls) == 1


def test_fp8_pipeline_is_close_to_full_precision(weights, student, faces):
    from appleswap.speed.fp8_linear import Fp8Linear

    ids = tiny_id_tokens(1)
    reference = student(ids, faces[0], num_steps=2, output_type="pt")
    pipe = SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu", fp8=True)
    assert isinstance(pipe.transformer.flux.single_transformer_blocks[0].proj_mlp.base_layer, Fp8Linear)
    out = pipe(ids, faces[0], num_steps=2, output_type="pt")
    difference = (out - reference).abs().mean().item()
    assert 0 < difference < 0.05, difference  # fp8 changes numerics a little, not the picture


def test_schedule_wide_timestep_rows_give_the_same_swaps(weights, faces, monkeypatch):
    """Every solver path with the per-step AdaLN rows and pass constants precomputed (the default, fused model)
    equals the reference model's swaps (``speed="eager"``: each pass computes everything itself)."""
    from appleswap.model.transformer import AppleTransformer
    from appleswap.speed.passes import SwapPasses
    from appleswap.speed.transformer import FastAppleTransformer

    teacher = SwapPipeline.from_pretrained(weights, "teacher", dtype=torch.float32, device="cpu")
    reference = SwapPipeline.from_pretrained(weights, "teacher", dtype=torch.float32, device="cpu", speed="eager")
    assert isinstance(teacher.transformer, FastAppleTransformer) and type(reference.transformer) is AppleTransformer
    ids, calls = tiny_id_tokens(1), []
    options = [{}, {"sampler_order": 2, "inversion_order": 2}, {"guidance_scale": 3.5, "image_guidance_scale": 2.0}]
    original = SwapPasses.step_table
    monkeypatch.setattr(SwapPasses, "step_table", lambda *a, **k: calls.append(a) or original(*a, **k))
    fast = [teacher(ids, faces[0], condition=faces[1], invert=True, num_steps=3, output_type="pt", **kwargs)
            for kwargs in options]
    assert len(calls) == 2 * len(options)  # inversion and regeneration each precompute their rows
    for kwargs, image in zip(options, fast, strict=True):
        slow = reference(ids, faces[0], condition=faces[1], invert=True, num_steps=3, output_type="pt", **kwargs)
        torch.testing.assert_close(image, slow, rtol=1e-5, atol=1e-5)


def test_progress_callback_reports_every_solver_step(weights, student, faces, capsys):
    """The per-step progress a UI draws: one record per solver step, in order, with the pass's length; a teacher
    swap reports its inversion, then its sampling; ``progress=True`` draws the tqdm bar on stderr."""
    steps: list[tuple] = []
    first = student(tiny_id_tokens(1), faces[0], num_steps=3,
                    callback=lambda s: steps.append((s["phase"], s["i"], s["total"])))
    assert steps == [("sampling", 0, 3), ("sampling", 1, 3), ("sampling", 2, 3)]
    np.testing.assert_array_equal(student(tiny_id_tokens(1), faces[0], num_steps=3), first)  # it only watches
    teacher = SwapPipeline.from_pretrained(weights, "teacher", dtype=torch.float32, device="cpu")
    steps.clear()
    teacher(tiny_id_tokens(1), faces[0], condition=faces[1], invert=True, num_steps=4, inverse_steps=2,
            callback=lambda s: steps.append((s["phase"], s["i"], s["total"])))
    assert steps == [("inverting", 0, 2), ("inverting", 1, 2), ("sampling", 0, 2), ("sampling", 1, 2)]
    capsys.readouterr()
    student(tiny_id_tokens(1), faces[0], num_steps=3, progress=True)
    err = capsys.readouterr().err
    assert re.search(r"sampling: +\d+%.*\| \d/3 \[", err) and "step" in err  # the bar of the 3 steps
