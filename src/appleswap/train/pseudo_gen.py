"""Pseudo-triplet generation: pseudo-triplets from the teacher with attribute-aware inversion (docs/method.md).

For each manifest pair (source B/b, target A/a): invert A/a to noise with A/a's condition and the null ID,
regenerate with B's (unmasked) ID tokens and the same condition, write ``{B}_{b}_{A}_{a}.png``. The manifest
``pairs.json`` is drawn once with the seed; ranks take strided shards; finished files are skipped, so a killed
job restarted with the same command ends with every pair exactly once. Launch over GPUs with
``torchrun --nproc_per_node N -m appleswap pseudo ...`` (RANK / WORLD_SIZE are read from the environment).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)


def pool_items(root: Path, condition_folder: str, aes_threshold: float, ids: Any = None) -> dict[str, list]:
    """Images above the aesthetic threshold that have a condition image (and, when ``ids`` is given, raw ID
    tokens to serve as a source), grouped by identity."""
    from appleswap.train.data import index_targets

    groups: dict[str, list] = {}
    for item in index_targets(root, condition_folder, aes_threshold):
        if ids is None or ids.has(item):
            groups.setdefault(item.identity, []).append(item)
    return groups


class PseudoGenerator:
    """Teacher + attribute-aware inversion for a batch of pairs, run by the swap pipeline (teacher mode,
    ``invert=True``, ``noID_trgCond``): the same sampler as ``appleswap swap`` and with its speed options (fused
    projections, compiled blocks and VAE, CUDA graphs, per-swap rows), since this is the job that runs 100,000 times.

    Deterministic and batch-independent: every pair's condition latent is drawn from the VAE posterior with its own
    generator seeded with ``seed`` (the reference's seed 0 for every image), and inversion and regeneration treat
    the rows of a batch independently, so a pair's triplet does not depend on the batch it ran in or its place
    there. ``batch_size`` pairs share one batched inversion and one batched generation; a short batch is padded
    to ``batch_size`` (with copies of its last pair, discarded) so the compiled shapes and recorded CUDA graphs of
    the full batch are reused instead of compiling and recording another shape."""

    def __init__(self, pipeline: Any, *, num_steps: int = 28, guidance: float = 1.0, seed: int = 0,
                 batch_size: int = 1) -> None:
        if pipeline.mode != "teacher":
            raise ValueError(f"pseudo-triplets come from the teacher; the pipeline is in {pipeline.mode!r} mode")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.pipeline, self.num_steps, self.guidance, self.seed = pipeline, num_steps, guidance, seed
        self.batch_size = batch_size

    @torch.no_grad()
    def swap(self, target: torch.Tensor, condition: torch.Tensor, source_tokens: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) targets and conditions in [0, 1], source tokens (B, 32, D) (or (32, D) for B = 1) ->
        (B, 3, H, W) swaps in [0, 1] on the CPU. B above ``batch_size`` runs in several calls."""
        source = source_tokens.reshape(-1, *source_tokens.shape[-2:])
        if not len(target) == len(condition) == len(source):
            raise ValueError(f"{len(target)} targets, {len(condition)} conditions, {len(source)} sources")
        return torch.cat([self._swap_padded(*(x[i:i + self.batch_size] for x in (target, condition, source)))
                          for i in range(0, len(target), self.batch_size)])

    def _swap_padded(self, target: torch.Tensor, condition: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
        count, pad = len(target), self.batch_size - len(target)
        if pad:
            target, condition, source = (torch.cat([x, x[-1:].expand(pad, *x.shape[1:])])
                                         for x in (target, condition, source))
        result = self.pipeline(source, target, condition=condition, invert=True, inverse_cond="noID_trgCond",
                               inversion_order=1, parity_wrong_midpoint=False,  # the release's pseudo script: Euler
                               num_steps=self.num_steps, guidance_scale=self.guidance,
                               seed=[self.seed] * len(target), output_type="pt")
        return result[:count].cpu()


def label_training_output(path: Path, image: np.ndarray, parent: Path) -> Path:
    """A pseudo-triplet written with the AI-generated label and signed C2PA credentials, but no pixel watermark:
    the student learns from these pixels, and a keyed pattern in every target would teach it to paint the mark."""
    from appleswap.provenance.labels import write_labelled_output

    return write_labelled_output(path, image, model="appleswap-teacher (pseudo-triplet)", parent=parent,
                                 watermark_key=None)


def generate_pairs(generator: PseudoGenerator, pairs: list, *, root: Path, out_dir: Path, id_cache: Path,
                   condition_folder: str, resolution: int, scorer: Callable | None = None,
                   failures: list[str] | None = None) -> int:
    """Write every missing output of ``pairs`` (one rank's shard), ``generator.batch_size`` pairs per teacher call;
    returns how many were generated.

    Finished files are skipped before batching, so a rerun's batches hold only missing pairs. A pair whose inputs
    are bad (unreadable image or condition, missing ID tokens) is logged, appended to ``failures`` and skipped (the
    next pair takes its place in the batch); a fault of the machine (disk full, permission) stops the run, and a
    rerun resumes. Scores and PNGs of a batch are written on a background thread while the next batch runs (it
    starts after the first batch, which records every CUDA graph of the job: no recording runs beside it)."""
    from concurrent.futures import ThreadPoolExecutor

    from tqdm import tqdm

    pending = [pair for pair in pairs if not (out_dir / pair.file_name).is_file()]
    remove_stale_temporaries(out_dir, pending)
    done = 0
    with ThreadPoolExecutor(1, thread_name_prefix="pseudo-writer") as writer, \
            tqdm(total=len(pairs), initial=len(pairs) - len(pending), desc="pseudo", unit="pair") as progress:
        writing = None
        for batch in _input_batches(pending, generator.batch_size, root=root, id_cache=id_cache,
                                    condition_folder=condition_folder, resolution=resolution, failures=failures):
            targets, conditions, tokens = (torch.stack(column) for column in zip(*(inputs for _, inputs in batch)))
            results = generator.swap(targets, conditions, tokens)
            if writing is not None:
                done += writing.result()  # a write that failed (disk full) stops the run here
            writing = writer.submit(_write_batch, [pair for pair, _ in batch], results, root, out_dir, scorer)
            progress.update(len(batch))
        if writing is not None:
            done += writing.result()
    return done


def remove_stale_temporaries(out_dir: Path, pending: list) -> int:
    """Delete the temporary files (``.{name}.XXXX.tmp``, of the PNG or its scores) that a killed run left for
    ``pending`` pairs: they are this rank's own (shards are disjoint), so another rank's writes are never touched."""
    from appleswap.train.pairs import SCORE_DIR

    stems = {Path(pair.file_name).stem for pair in pending}
    removed = 0
    for folder in (out_dir, out_dir / SCORE_DIR):
        for path in folder.glob(".*.tmp") if folder.is_dir() else []:
            name = path.name[1:].rsplit(".", 2)[0]  # ".{name}.{random}.tmp" -> name
            if Path(name).stem in stems:
                path.unlink(missing_ok=True)
                removed += 1
    return removed


def _input_batches(pending: list, batch_size: int, *, root: Path, id_cache: Path, condition_folder: str,
                   resolution: int, failures: list[str] | None) -> Iterator[list]:
    """``(pair, (target, condition, source tokens))`` lists of ``batch_size`` loadable pairs (the last may be
    shorter); pairs whose inputs cannot be read are reported and left out."""
    from appleswap.files import raise_if_environment
    from appleswap.train.data import IdTokenStore, image_path, load_rgb

    raw = IdTokenStore(id_cache, "raw")
    batch: list = []
    for pair in pending:
        try:
            target = load_rgb(image_path(root, pair.target), resolution)
            condition = load_rgb(root / pair.target.identity / condition_folder / f"{pair.target.name}.png",
                                 resolution)
            tokens = raw.tokens(pair.source)
        except (ValueError, FileNotFoundError) as error:
            raise_if_environment(error, root / pair.target.identity)
            log.error("%s: %s", pair.file_name, error)
            if failures is not None:
                failures.append(f"{pair.file_name}: {error}")
            continue
        batch.append((pair, (target, condition, tokens)))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _write_batch(pairs: list, results: torch.Tensor, root: Path, out_dir: Path, scorer: Callable | None) -> int:
    """Scores, then the labelled PNG, of each pair (an existing PNG always has its scores); each file written
    atomically."""
    from appleswap.files import save_json
    from appleswap.train.data import image_path
    from appleswap.train.pairs import SCORE_DIR

    for pair, result in zip(pairs, results, strict=True):
        out = out_dir / pair.file_name
        image = (result.permute(1, 2, 0).numpy() * 255 + 0.5).astype(np.uint8)
        if scorer is not None:
            save_json(out_dir / SCORE_DIR / f"{out.stem}.json", scorer(pair, image))
        label_training_output(out, image, parent=image_path(root, pair.target))
    return len(pairs)
