"""The README's commands on the tiny weights of `scripts/make_tiny_weights.py`: every file they need is there,
and (APPLESWAP_SLOW=1) each command runs end to end, one feeding the next, as a new user would try them."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from appleswap.cli import main
from appleswap.weights import check

REPO = Path(__file__).resolve().parents[1]
NOT_IN_TINY = {"fid_inception", "occlusion_deeplabv3"}  # full-size networks; eval / preprocess run without them


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """What `scripts/make_tiny_weights.py DIR` writes."""
    from tests.fixtures.tiny_extras import make_tiny_extra_weights
    from tests.fixtures.tiny_flux import make_tiny_weights
    from tests.fixtures.tiny_identity import make_tiny_identity_weights

    return make_tiny_extra_weights(make_tiny_identity_weights(make_tiny_weights(tmp_path_factory.mktemp("tiny"))))


def test_tiny_weights_hold_every_registry_file_the_commands_need(tiny):
    missing = {row["name"] for row in check(tiny) if row["status"] == "missing"}
    assert missing == NOT_IN_TINY
    text = (REPO / "scripts" / "make_tiny_weights.py").read_text()
    assert "make_tiny_extra_weights" in text  # the script writes the same folder as this fixture


@pytest.mark.slow
def test_every_readme_command_runs_on_tiny_weights(tiny, tmp_path, faces_dir):
    run = tmp_path
    weights = ["--weights-dir", str(tiny), "--device", "cpu"]
    photos = run / "photos"
    for identity, names in {"obama": ["obama", "obama1"], "biden": ["biden", "biden2"]}.items():
        (photos / identity).mkdir(parents=True)
        for name in names:
            shutil.copy(faces_dir / f"{name}.jpg", photos / identity / f"{name}.jpg")
    small = ["--size", "64", "--steps", "1"]
    assert main(["weights", "check", *weights]) == 0
    assert main(["preprocess", str(photos), str(run / "data"), "--aesthetic", "--parser", "auto", "--preview",
                 *weights]) == 0
    assert (run / "data" / "score.json").is_file() and (run / "data" / "preview.jpg").is_file()
    assert main(["prepare-ids", str(run / "data"), "-o", str(run / "ids"), *weights]) == 0
    assert len(list((run / "ids" / "raw").rglob("*.safetensors"))) == 4  # the faces, not the preview
    assert main(["identity", "-s", str(faces_dir / "obama.jpg"), "-o", str(run / "me.safetensors"), *weights]) == 0
    assert main(["swap", "-s", str(run / "me.safetensors"), "-t", str(faces_dir / "biden2.jpg"), "-o",
                 str(run / "out.jpg"), *small, *weights]) == 0
    (run / "pairs.csv").write_text("source,target,name\ndata/obama/obama.jpg,data/biden/biden2.jpg,p0\n")
    assert main(["generate", "--pairs", str(run / "pairs.csv"), "-o", str(run / "gen"), *small, "--dtype", "fp32",
                 *weights]) == 0
    train = ["--dataset-root", str(run / "data"), "--id-cache", str(run / "ids"), "--size", "64", "--dtype", "fp32",
             "--aes-threshold", "none", "--max-steps", "1", "--batch-size", "1", "--gradient-accumulation", "1",
             "--num-validation", "1", "--validate-every", "0", "--lora-rank", "4", "--lora-alpha", "4",
             "--workers", "0", "--no-gradient-checkpointing", *weights]
    assert main(["train", "teacher", "--config", str(REPO / "configs" / "teacher.yaml"), "-o", str(run / "t"),
                 *train]) == 0
    teacher_lora = next((run / "t" / "checkpoints").rglob("default.safetensors"))
    assert main(["pseudo", "--config", str(REPO / "configs" / "pseudo.yaml"), "--dataset-root", str(run / "data"),
                 "--id-cache", str(run / "ids"), "-o", str(run / "pseudo"), "--lora", str(teacher_lora),
                 "--num-pairs", "2", "--aes-threshold", "none", "--dtype", "fp32", *small, *weights]) == 0
    assert main(["train", "student", "--config", str(REPO / "configs" / "student.yaml"), "-o", str(run / "s"),
                 "--pseudo-root", str(run / "pseudo"), *train]) == 0
    (run / "eval.csv").write_text("id,source,target\np0,obama/obama.jpg,biden/biden2.jpg\n")
    assert main(["eval", "--pairs", str(run / "eval.csv"), "--sources", str(run / "data"), "--targets",
                 str(run / "data"), "--swapped", str(run / "gen"), "-o", str(run / "report"), "--bootstrap", "20",
                 "--set-resamples", "2", *weights]) == 0
    assert (run / "report" / "report.json").is_file()
