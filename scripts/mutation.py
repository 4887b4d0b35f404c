"""Mutation score of the core modules (developer tool, `make mutation`; not part of CI's time budget).

Each target is one core module with the few fast test files that should catch its bugs. mutmut (pinned in
requirements.txt) rewrites the module into mutants (a flipped operator, a changed constant, a dropped argument,
...) and runs those tests against each one; a mutant no test fails on "survived". The score of a module is

    killed / (mutants - equivalent)

where ``scripts/mutation_equivalent.toml`` lists, with a reason, the mutants that cannot change behaviour (so
no test could kill them). Targets run one at a time in ``.mutation/<target>/`` (a scratch folder with links to
``src`` and ``tests``); the machine is shared, so ``--jobs`` defaults to 1 and the large modules are restricted
to the functions whose bugs matter (``functions``: mutmut name globs).

    python scripts/mutation.py                 # every target, a table at the end
    python scripts/mutation.py weights sampling --jobs 2
    python scripts/mutation.py --list          # the targets, their sources and tests
    python scripts/mutation.py watermark --diff   # also print each survivor's diff
    python scripts/mutation.py align --survivors  # after writing tests: test only the last run's survivors again
"""

from __future__ import annotations

import argparse
import dataclasses
import fnmatch
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parents[1]
WORK = REPO / ".mutation"
EQUIVALENT_FILE = REPO / "scripts" / "mutation_equivalent.toml"
KILLED = {"killed", "timeout", "caught by type check"}


@dataclasses.dataclass(frozen=True)
class Target:
    sources: tuple[str, ...]  # files under src/ to mutate
    tests: tuple[str, ...]  # the fast test files (or file::test ids) that must kill its mutants
    functions: tuple[str, ...] = ()  # mutmut name globs to restrict to (empty: the whole module)


TARGETS: dict[str, Target] = {
    "sampling": Target(
        ("src/appleswap/sampling/guidance.py", "src/appleswap/sampling/samplers.py",
         "src/appleswap/sampling/schedule.py", "src/appleswap/speed/steps.py"),
        ("tests/sampling/test_samplers.py", "tests/speed/test_steps.py", "tests/sampling/test_solver_math.py")),
    "lora": Target(
        ("src/appleswap/model/lora.py",),
        # (not test_lora_routing.py's finite-difference gradient test: ~100 s per mutant on 2 shared cores)
        ("tests/model/test_lora_units.py",
         *(f"tests/model/test_lora_routing.py::{name}" for name in (
             "test_routed_linear_is_the_hand_formula", "test_text_rows_and_plain_layers_never_see_the_lora",
             "test_disabled_adapter_is_the_base_layer", "test_x_embedder_lora_acts_as_a_changed_condition_only",
             "test_no_condition_keeps_the_lora_out_of_the_graph"))),
        ("appleswap.model.lora.x_routed_linear*", "appleswap.model.lora.x_lora_delta*",
         "appleswap.model.lora.x_add_to_rows*", "appleswap.model.lora.x_base_linear*",
         "appleswap.model.lora.x__active_adapters*", "appleswap.model.lora.x_is_lora_layer*",
         "appleswap.model.lora.x_read_lora_file*", "appleswap.model.lora.x_lora_modules_and_rank*",
         "appleswap.model.lora.x_apple_target_modules*")),
    "id_attention": Target(
        ("src/appleswap/model/id_attention.py",),
        ("tests/model/test_id_attention.py",
         "tests/model/test_lora_routing.py::test_id_weight_scales_the_id_residual_in_both_paths")),
    "align": Target(
        ("src/appleswap/faces/align.py",),
        ("tests/faces/test_align_recipe.py", "tests/faces/test_paste_back.py"),
        ("appleswap.faces.align.x__eyes_mouth*", "appleswap.faces.align.x_ffhq_quad*",
         "appleswap.faces.align.x_quad_matrix*", "appleswap.faces.align.x_align_face*",
         "appleswap.faces.align.x_invert_matrix*", "appleswap.faces.align.x__outside*",
         "appleswap.faces.align.x_paste_back*")),
    "condition": Target(
        ("src/appleswap/preprocess/condition.py",),
        ("tests/preprocess/test_condition_pixels.py", "tests/preprocess/test_condition.py")),
    "train": Target(
        ("src/appleswap/train/losses.py", "src/appleswap/train/pairs.py", "src/appleswap/train/checkpoint.py"),
        ("tests/train/test_losses.py", "tests/train/test_pairs.py", "tests/train/test_checkpoint_resume.py",
         "tests/train/test_losses_pairs_units.py", "tests/train/test_checkpoint_units.py"),
        ("appleswap.train.losses.x_noisy_latents*", "appleswap.train.losses.x_flow_matching_loss*",
         "appleswap.train.losses.x_predicted_x0*", "appleswap.train.losses.x_gated_mean*",
         "appleswap.train.losses.x_sample_timesteps*", "appleswap.train.losses.x_crop_face*",
         "appleswap.train.pairs.*", "appleswap.train.checkpoint.*")),
    "fp8_training": Target(
        ("src/appleswap/speed/fp8_training.py",),
        # (not the torch.compile tests: dynamo does not trace mutmut's trampolines)
        tuple(f"tests/speed/test_fp8_training.py::{name}" for name in (
            "test_the_two_e4m3_copies_round_w_and_its_transpose",
            "test_forward_and_input_gradient_equal_the_dequantised_products",
            "test_bf16_products_take_the_rowwise_scaled_mm",
            "test_without_the_transposed_copy_the_input_gradient_uses_the_forward_copy",
            "test_unaligned_sizes_fall_back_to_the_dequantised_matmul", "test_trainable_linears_are_refused",
            "test_lora_around_the_fp8_base_trains_and_the_base_gets_no_gradient",
            "test_quantize_frozen_fp8_replaces_the_block_linears_and_keeps_modulation_and_lora",
            "test_ddp_leaves_the_e4m3_copies_alone", "test_fewer_than_16_rows_fall_back_to_the_dequantised_matmul",
            "test_layer_defaults_no_bias_and_the_stored_transposed_copy",
            "test_quantize_frozen_fp8_options_and_an_apple_transformer"))),
    "aux_losses": Target(
        ("src/appleswap/train/teacher.py",),
        tuple(f"tests/train/test_training_speed.py::{name}" for name in (
            "test_loss_weights_scale_their_terms_in_the_training_loss",
            "test_recomputed_aux_losses_give_the_batched_loss_and_gradients",
            "test_recomputed_aux_losses_keep_no_decoder_activations_for_backward",
            "test_aux_losses_take_exactly_the_gated_samples_in_each_network_s_range",
            "test_each_aux_loss_decodes_only_what_its_own_gate_and_weight_ask")),
        ("appleswap.train.teacher.x__auxiliary_losses*", "appleswap.train.teacher.x__aux_terms*",
         "appleswap.train.teacher.x__recomputed_aux_terms*")),
    "weights": Target(
        ("src/appleswap/weights.py",),
        ("tests/test_weights_registry.py",),
        ("appleswap.weights.x_get_spec*", "appleswap.weights.x_weights_dir*", "appleswap.weights.x_expected_path*",
         "appleswap.weights.x_env_override_name*", "appleswap.weights.x__missing_parts*",
         "appleswap.weights.x_locate*", "appleswap.weights.x_check__*", "appleswap.weights.x_sha256_of*")),
    "watermark": Target(
        ("src/appleswap/provenance/watermark.py",),
        # (tests/app/test_watermark_false_alarm.py checks the threshold, a module constant mutmut does not mutate)
        ("tests/app/test_watermark_math.py", "tests/app/test_provenance_watermark.py"),
        # the embedding, the folding and the z score; not the lattice-search heuristics (_lattice_candidates,
        # _refine_lattice, _subpixel_peak, _refines, _same_lattice: 372 of 825 mutants, ~9 s each), which the
        # edit tests of test_provenance_watermark.py check as a whole (the mark is found after each edit)
        tuple(f"appleswap.provenance.watermark.x{name}*" for name in (
            "_key_tile", "_pattern_tile", "__band_mask", "__luminance", "__tile_scale", "__activity_gain",
            "_watermark_delta", "_embed_watermark", "__analysis_luma", "__whiten", "__autocorrelation", "__fold",
            "__orientations", "ǁWatermarkSearchǁscore", "_search_lattices", "_detect_watermark"))),
}


def read_equivalents(path: Path = EQUIVALENT_FILE) -> dict[str, str]:
    """``{mutant name: why it cannot change behaviour}`` from the TOML list (one table per target)."""
    if not path.is_file():
        return {}
    data = tomllib.loads(path.read_text())
    return {name: reason for table in data.values() for name, reason in table.items()}


def _config(target: Target) -> str:
    def toml_list(items) -> str:
        return "[" + ", ".join(json.dumps(item) for item in items) + "]"

    return ("[tool.mutmut]\n"
            'source_paths = ["src/"]\n'
            f"only_mutate = {toml_list(target.sources)}\n"
            f"pytest_add_cli_args_test_selection = {toml_list(target.tests)}\n"
            'pytest_add_cli_args = ["-p", "no:cacheprovider", "-q", "-x"]\n'
            "use_git_change_detection = false\n")


def _prepare(name: str, target: Target, fresh: bool) -> Path:
    folder = WORK / name
    if fresh and folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for link in ("src", "tests"):
        if not (folder / link).exists():
            (folder / link).symlink_to(REPO / link)
    (folder / "pyproject.toml").write_text(_config(target))
    return folder


def _mutmut(folder: Path, *args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}  # mutmut puts mutants/src first itself
    # mutmut forks a child per mutant from a process that already ran torch: a thread pool in the parent leaves
    # the child waiting forever on a lock only a parent thread could release, so keep every pool at one thread
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", OPENBLAS_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
    mutmut = Path(sys.executable).with_name("mutmut")
    return subprocess.run([str(mutmut), *args], cwd=folder, env=env, capture_output=True, text=True, check=False)


def _results(folder: Path) -> dict[str, str]:
    out = _mutmut(folder, "results", "--all", "true").stdout
    statuses = {}
    for line in out.splitlines():
        name, sep, status = line.strip().rpartition(": ")
        if sep and name.startswith("appleswap."):
            statuses[name] = status
    return statuses


def run_target(name: str, target: Target, jobs: int, fresh: bool, survivors_only: bool = False) -> dict:
    """Run mutmut on one target; returns its counts and survivors. ``survivors_only``: keep the previous run's
    verdicts and test only its survivors again (after new tests were written)."""
    missing = [t for t in target.tests if not (REPO / t.split("::")[0]).is_file()]
    if missing:
        raise SystemExit(f"mutation: {name}: test file(s) {missing} not found")
    selection = list(target.functions)
    if survivors_only:
        previous = _results(WORK / name) if (WORK / name / "mutants").is_dir() else {}
        if target.functions:
            previous = {k: v for k, v in previous.items() if any(fnmatch.fnmatch(k, g) for g in target.functions)}
        equivalents = read_equivalents()
        selection = sorted(k for k, v in previous.items() if v not in KILLED and k not in equivalents)
        if not previous:
            raise SystemExit(f"mutation: {name}: no previous run to take the survivors of (run it without --survivors)")
    folder = _prepare(name, target, fresh and not survivors_only)
    start = time.monotonic()
    proc = _mutmut(folder, "run", "--max-children", str(jobs), *selection) if selection or not survivors_only else None
    elapsed = time.monotonic() - start
    statuses = _results(folder)
    if target.functions:
        statuses = {k: v for k, v in statuses.items() if any(fnmatch.fnmatch(k, g) for g in target.functions)}
    if not statuses:
        tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-15:]) if proc else ""
        raise SystemExit(f"mutation: {name}: mutmut produced no results:\n{tail}")
    equivalents = read_equivalents()
    equivalent = sorted(k for k in statuses if k in equivalents)
    counted = {k: v for k, v in statuses.items() if k not in equivalents}
    killed = sorted(k for k, v in counted.items() if v in KILLED)
    survivors = sorted(k for k, v in counted.items() if v not in KILLED)
    total = len(counted)
    return {"target": name, "mutants": len(statuses), "equivalent": len(equivalent), "killed": len(killed),
            "survivors": {k: counted[k] for k in survivors}, "score": len(killed) / total if total else 1.0,
            "seconds": round(elapsed)}


def print_table(rows: list[dict]) -> None:
    print(f"\n{'target':<14} {'mutants':>7} {'equiv.':>6} {'killed':>6} {'left':>5} {'score':>7} {'time':>6}")
    for row in rows:
        print(f"{row['target']:<14} {row['mutants']:>7} {row['equivalent']:>6} {row['killed']:>6} "
              f"{len(row['survivors']):>5} {row['score']:>7.1%} {row['seconds']:>5}s")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("targets", nargs="*", help=f"targets to run (default: all): {', '.join(TARGETS)}")
    parser.add_argument("--jobs", type=int, default=1, help="mutants tested in parallel (default 1)")
    parser.add_argument("--keep", action="store_true", help="reuse the previous run's results where still valid")
    parser.add_argument("--survivors", action="store_true",
                        help="keep the previous run's verdicts and test only its survivors again (after new tests)")
    parser.add_argument("--diff", action="store_true", help="print each survivor's diff")
    parser.add_argument("--list", action="store_true", help="list the targets and exit")
    parser.add_argument("--tests", nargs="+", help="run the target(s) with these test files instead (a baseline)")
    parser.add_argument("--goal", type=float, default=0.9, help="exit 1 when a target scores below this")
    args = parser.parse_args(argv)
    if args.list:
        for name, target in TARGETS.items():
            print(f"{name}: {', '.join(target.sources)}\n  tests: {', '.join(target.tests)}"
                  + (f"\n  functions: {', '.join(target.functions)}" if target.functions else ""))
        return 0
    unknown = [t for t in args.targets if t not in TARGETS]
    if unknown:
        parser.error(f"unknown target(s) {unknown}; known: {', '.join(TARGETS)}")
    rows = []
    for name in args.targets or list(TARGETS):
        print(f"mutation: {name} ...", flush=True)
        target = TARGETS[name]
        label = name
        if args.tests:  # a baseline: its own scratch folder, so the target's last run stays
            target = dataclasses.replace(target, tests=tuple(args.tests))
            label = f"{name}-baseline"
        row = run_target(label, target, args.jobs, fresh=not args.keep, survivors_only=args.survivors)
        rows.append(row)
        print(f"  {row['killed']} of {row['mutants'] - row['equivalent']} non-equivalent mutants killed "
              f"({row['score']:.1%}, {row['equivalent']} equivalent) in {row['seconds']} s", flush=True)
        for mutant, status in row["survivors"].items():
            print(f"  {status}: {mutant}")
            if args.diff:
                print(_mutmut(WORK / label, "show", mutant).stdout)
    print_table(rows)
    (WORK / "summary.json").write_text(json.dumps(rows, indent=1))
    print(f"(details: {WORK / 'summary.json'}; a survivor's diff: cd .mutation/<target> && mutmut show NAME)")
    return 0 if all(row["score"] >= args.goal for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
