"""The pseudo-triplet generator runs the swap pipeline: the result is the inversion of docs/method.md written out by hand, the
same for a pair at any batch size and place; `generate_pairs` in batches: a run stopped after a batch and rerun
writes every pair exactly once, complete, equal to an uninterrupted batch-1 run; a pair with missing inputs is
reported."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from appleswap.files import load_image, save_image
from appleswap.identity.store import save_identity
from appleswap.model.latents import decode_tokens, encode_images, image_ids, vae_scale_factor
from appleswap.pipeline import SwapPipeline, derived_seed
from appleswap.sampling import invert, sample_euler
from appleswap.train.data import Item
from appleswap.train.pairs import Pair
from appleswap.train.pseudo_gen import PseudoGenerator, generate_pairs
from tests.fixtures.tiny_flux import TINY_ID_DIM, make_tiny_weights, one_thread, tiny_id_tokens  # noqa: F401


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return make_tiny_weights(tmp_path_factory.mktemp("weights"))


def _by_hand(pipe: SwapPipeline, target, condition, source, null, steps: int) -> torch.Tensor:
    """Invert the target (posterior mode) under its condition latent (posterior sample from seed 0's condition
    stream) and the null ID, then regenerate from that noise with the source ID and the same condition; decode."""
    model, vae = pipe.transformer, pipe.vae
    ids = image_ids(64, 64, vae_scale=vae_scale_factor(vae))
    cond = encode_images(vae, condition, sample=True,
                         generator=torch.Generator().manual_seed(derived_seed(0, "condition")))
    sigmas = pipe.schedule(steps, ids.shape[0])
    guidance = torch.ones(1)

    def velocity(id_tokens):
        return lambda x, sigma: model(x, sigma, text=pipe.text, img_ids=ids, condition=cond, id_tokens=id_tokens,
                                      guidance=guidance)

    noise = invert(velocity(null), encode_images(vae, target), sigmas, disable=True)
    return decode_tokens(vae, sample_euler(velocity(source), noise, sigmas, disable=True), 64, 64)


@torch.no_grad()
def test_pseudo_triplet_is_the_teacher_inversion_swap(weights):
    null, source = tiny_id_tokens(1, seed=9), tiny_id_tokens(1, seed=4)
    teacher = SwapPipeline.from_pretrained(weights, "teacher", dtype=torch.float32, device="cpu", null_id=null)
    generator = PseudoGenerator(teacher, num_steps=3)
    torch.manual_seed(0)
    target, condition = torch.rand(1, 3, 64, 64), torch.rand(1, 3, 64, 64)
    out = generator.swap(target, condition, source[0])
    assert out.shape == (1, 3, 64, 64) and out.device.type == "cpu"
    torch.testing.assert_close(out, _by_hand(teacher, target, condition, source, null, 3), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(generator.swap(target, condition, source[0]), out, rtol=0, atol=0)  # seeded
    other = generator.swap(target, condition, tiny_id_tokens(1, seed=11)[0])
    assert (other - out).abs().max() > 1e-3  # the source identity reaches the image
    student = SwapPipeline.from_pretrained(weights, "student", dtype=torch.float32, device="cpu")
    with pytest.raises(ValueError, match="teacher"):
        PseudoGenerator(student)


@torch.no_grad()
def test_a_pairs_triplet_does_not_depend_on_its_batch_or_place(weights):
    """Batch 1 is the reference (checked against spec §7 above); batch 3, the reversed batch and batch 2 (a padded
    short second call) give every pair the same triplet."""
    teacher = SwapPipeline.from_pretrained(weights, "teacher", dtype=torch.float32, device="cpu",
                                           null_id=tiny_id_tokens(1, seed=9))
    torch.manual_seed(1)
    targets, conditions = torch.rand(3, 3, 64, 64), torch.rand(3, 3, 64, 64)
    sources = tiny_id_tokens(3, seed=12)
    single = PseudoGenerator(teacher, num_steps=3, batch_size=1)
    alone = torch.cat([single.swap(targets[i:i + 1], conditions[i:i + 1], sources[i]) for i in range(3)])
    assert min((alone[i] - alone[j]).abs().max() for i, j in ((0, 1), (0, 2), (1, 2))) > 1e-3  # distinct pairs
    batched = PseudoGenerator(teacher, num_steps=3, batch_size=3)
    torch.testing.assert_close(batched.swap(targets, conditions, sources), alone, rtol=1e-5, atol=1e-5)
    flipped = batched.swap(targets.flip(0), conditions.flip(0), sources.flip(0))
    torch.testing.assert_close(flipped.flip(0), alone, rtol=1e-5, atol=1e-5)
    padded = PseudoGenerator(teacher, num_steps=3, batch_size=2)
    torch.testing.assert_close(padded.swap(targets, conditions, sources), alone, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="batch_size"):
        PseudoGenerator(teacher, batch_size=0)


CONDITIONS = "condition"
PEOPLE = {"ann": ["a0", "a1", "a2"], "bob": ["b0", "b1", "b2"]}


@pytest.fixture(scope="module")
def teacher(weights):
    return SwapPipeline.from_pretrained(weights, "teacher", dtype=torch.float32, device="cpu",
                                        null_id=torch.zeros(1, 32, TINY_ID_DIM))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> tuple[Path, Path]:
    """Random 64-pixel photos with condition images and raw ID tokens in the layout `appleswap pseudo` reads;
    bob/b2 has no ID tokens (a bad source)."""
    root = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    for identity, names in PEOPLE.items():
        for n, name in enumerate(names):
            save_image(root / "data" / identity / f"{name}.jpg", rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            save_image(root / "data" / identity / CONDITIONS / f"{name}.png",
                       rng.integers(0, 256, (64, 64, 3), dtype=np.uint8))
            if (identity, name) != ("bob", "b2"):
                tokens = torch.randn(1, 32, TINY_ID_DIM, generator=torch.Generator().manual_seed(10 * n + len(name)))
                save_identity(root / "ids" / "raw" / identity / f"{name}.safetensors", tokens + len(identity))
    return root / "data", root / "ids"


def _pairs() -> list[Pair]:
    """7 pairs in both directions; the one whose source is bob/b2 cannot be generated."""
    items = {k: [Item(k, n) for n in v] for k, v in PEOPLE.items()}
    ann, bob = items["ann"], items["bob"]
    return [Pair(ann[0], bob[0]), Pair(bob[1], ann[1]), Pair(ann[2], bob[1]), Pair(bob[2], ann[0]),
            Pair(bob[0], ann[2]), Pair(ann[1], bob[2]), Pair(bob[1], ann[0])]


class StopAfter(PseudoGenerator):
    """The teacher killed during its ``calls``+1-th batch (the batches before it finished)."""

    def __init__(self, *args, calls: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls, self.rows = calls, 0

    def swap(self, target, condition, source_tokens):
        if self.calls == 0:
            raise KeyboardInterrupt
        self.calls -= 1
        self.rows += len(target)
        return super().swap(target, condition, source_tokens)


def _run(generator, out: Path, dataset, failures=None) -> int:
    root, ids = dataset
    return generate_pairs(generator, _pairs(), root=root, out_dir=out, id_cache=ids, condition_folder=CONDITIONS,
                          resolution=64, failures=failures)


def test_stopped_after_a_batch_and_rerun_writes_each_pair_once(teacher, dataset, tmp_path, monkeypatch):
    good = sorted(p.file_name for p in _pairs() if p.source.key != "bob/b2")
    reference = tmp_path / "reference"
    failures: list[str] = []
    assert _run(PseudoGenerator(teacher, num_steps=2, batch_size=1), reference, dataset, failures) == 6
    assert len(failures) == 1 and failures[0].startswith("bob_b2_ann_a0.png")

    writes: list[str] = []
    import appleswap.train.pseudo_gen

    real_write = appleswap.train.pseudo_gen.label_training_output
    monkeypatch.setattr(appleswap.train.pseudo_gen, "label_training_output",
                        lambda path, *a, **k: (writes.append(Path(path).name), real_write(path, *a, **k))[1])
    out = tmp_path / "batched"
    with pytest.raises(KeyboardInterrupt):
        _run(StopAfter(teacher, num_steps=2, batch_size=4, calls=1), out, dataset)
    first = sorted(p.name for p in out.glob("*.png"))
    assert len(first) == 4 and sorted(writes) == first  # the finished batch is on disk, nothing of the next
    assert not list(out.glob(".*"))  # no temporary or partial file
    missing = sorted(set(good) - set(first))
    stale = [out / f".{missing[0]}.k3x9q1.tmp", out / "scores" / f".{Path(missing[1]).stem}.json.a1b2c3.tmp"]
    for path in stale:  # what a SIGKILL during a write leaves behind
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(b"partial")
    other_rank = out / ".someone_else_ann_a9.png.zz9.tmp"
    other_rank.write_bytes(b"partial")
    rerun = StopAfter(teacher, num_steps=2, batch_size=4, calls=99)
    assert _run(rerun, out, dataset, failures := []) == 2 and len(failures) == 1
    assert rerun.rows == 2  # only the missing pairs ran (one short batch, padded inside the generator)
    assert sorted(writes) == good and sorted(p.name for p in out.glob("*.png")) == good  # each exactly once
    assert not any(path.exists() for path in stale) and other_rank.exists()  # only this run's pairs' leftovers
    for name in good:
        got, want = load_image(out / name).astype(int), load_image(reference / name).astype(int)
        assert np.abs(got - want).max() <= 1, name  # batch 4 (and its padding) == batch 1, up to a rounding tie
