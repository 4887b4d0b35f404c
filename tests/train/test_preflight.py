"""`appleswap train` checks every input and weight before loading any model, and names the command that makes
each missing one (issue 25: it asked for a score.json only --aesthetic writes, after 18 s of model loading)."""

from __future__ import annotations

import pytest

from appleswap.cli import main


@pytest.fixture
def no_model_loading(monkeypatch):
    from appleswap.model import loading

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the inputs were checked")

    monkeypatch.setattr(loading, "load_apple_transformer", refuse)
    monkeypatch.setattr(loading, "load_vae", refuse)


def _train(tmp_path, stage: str, *extra: str) -> list[str]:
    return ["train", stage, "--dataset-root", str(tmp_path / "data"), "--id-cache", str(tmp_path / "ids"),
            "-o", str(tmp_path / "run"), "--weights-dir", str(tmp_path / "weights"), "--device", "cpu", *extra]


def test_teacher_lists_every_missing_input_with_its_command(tmp_path, capsys, no_model_loading):
    (tmp_path / "data" / "alice").mkdir(parents=True)  # preprocessed without --aesthetic: no score.json
    assert main(_train(tmp_path, "teacher")) == 2
    err = capsys.readouterr().err
    assert "score.json" in err and "--aesthetic" in err and "--aes-threshold none" in err
    assert f"appleswap prepare-ids {tmp_path / 'data'} -o {tmp_path / 'ids'}" in err
    for name in ("flux", "pulid_flux", "arcface_simswap", "vgg16_lpips"):
        assert f"missing weights '{name}'" in err
    assert "appleswap train convert-arcface" in err  # how the ArcFace file is made
    assert not (tmp_path / "run").exists()


def test_no_aesthetic_filter_needs_no_scores_and_turned_off_losses_need_no_weights(tmp_path, capsys,
                                                                                   no_model_loading):
    (tmp_path / "data" / "alice").mkdir(parents=True)
    code = main(_train(tmp_path, "teacher", "--aes-threshold", "none", "--id-loss", "none", "--lpips-weight", "0"))
    err = capsys.readouterr().err
    assert code == 2
    assert "score.json" not in err and "arcface_simswap" not in err and "vgg16_lpips" not in err
    assert "missing weights 'flux'" in err and "prepare-ids" in err


def test_student_names_the_pseudo_command(tmp_path, capsys, no_model_loading):
    assert main(_train(tmp_path, "student", "--pseudo-root", str(tmp_path / "pseudo"))) == 2
    err = capsys.readouterr().err
    assert "appleswap preprocess" in err and "appleswap pseudo" in err
