"""One flag vocabulary across every subcommand, old spellings as hidden deprecated aliases, and config files
whose keys accept every flag (``cli_common.apply_config_file``)."""

from __future__ import annotations

import argparse

import pytest

from appleswap.cli import build_parser, main
from appleswap.cli_common import apply_config_file, config_actions

# the old spellings issue 25 retired: none may show in any --help
RETIRED = {"--num-steps", "--resolution", "--mode", "--teacher", "--out", "--output-dir", "--mixed-precision",
           "--batch", "--guidance", "--num-workers"}
DTYPES = ["bf16", "fp16", "fp32"]
# arguments a command needs besides the flag under test (positionals, and the required options)
NEEDS = {("preprocess",): ["IN", "OUT"], ("prepare-ids",): ["DATA"], ("train", "convert-arcface"): ["A", "B"]}
LATE = {("swap",): {"source": ["s.jpg"], "target": "t.jpg", "output": "o.jpg"},
        ("identity",): {"source": ["s.jpg"], "output": "id.safetensors"}, ("prepare-ids",): {"output": "cache"}}


def leaves(parser: argparse.ArgumentParser, names: tuple[str, ...] = ()):
    """(command words, parser) for every runnable (sub)command."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    if not subs:
        yield names, parser
        return
    for name, sub in subs[0].choices.items():
        yield from leaves(sub, (*names, name))


def visible_options(parser: argparse.ArgumentParser) -> set[str]:
    return {o for a in parser._actions if a.help != argparse.SUPPRESS for o in a.option_strings}


def test_every_command_speaks_one_vocabulary():
    commands = dict(leaves(build_parser()))
    assert {("swap",), ("generate",), ("pseudo",), ("train", "teacher"), ("eval",), ("bench",)} <= set(commands)
    for names, parser in commands.items():
        assert not visible_options(parser) & RETIRED, names
        for action in parser._actions:
            if "--dtype" in action.option_strings:
                assert list(action.choices) == DTYPES, names
            if "--model" in action.option_strings:
                assert sorted(action.choices) == ["student", "teacher"], names
            if "--output" in action.option_strings:
                assert "-o" in action.option_strings, names
    # the concepts issue 25 names are there, spelled the one way
    assert {"--steps", "--size", "--dtype", "--model", "--lora", "-o"} <= visible_options(commands[("swap",)])
    assert {"--steps", "--size", "--dtype", "--model", "--lora", "-o"} <= visible_options(commands[("generate",)])
    assert {"--steps", "--size", "--dtype", "--lora", "-o"} <= visible_options(commands[("pseudo",)])
    assert {"--size", "--dtype", "-o"} <= visible_options(commands[("train", "teacher")])
    assert {"--dtype", "-o"} <= visible_options(commands[("prepare-ids",)])
    assert "--cache" not in visible_options(commands[("prepare-ids",)])  # its output, now -o (eval's is a cache)
    assert {"-o", "--batch-size"} <= visible_options(commands[("bench",)])


def _sample(action: argparse.Action):
    """A valid config value for ``action`` and what the parsed namespace should then hold."""
    if isinstance(action, argparse.BooleanOptionalAction) or action.nargs == 0:
        return True, True if isinstance(action, argparse.BooleanOptionalAction) else action.const
    if action.choices:
        raw = max(action.choices)
        return raw, raw
    raw = {"int": 3, "float": 0.5}.get(getattr(action.type, "__name__", ""), "x")
    parsed = action.type(raw) if action.type is not None and isinstance(raw, str) else raw
    many = action.nargs in ("+", "*")
    return ([raw] if many else raw), ([parsed] if many else parsed)


def test_every_flag_is_accepted_as_a_config_key(tmp_path):
    import yaml

    parser = build_parser()
    checked = 0
    for names, leaf in leaves(parser):
        if "--config" not in visible_options(leaf):
            assert names in {("verify",), ("app",)}  # no config file to read (verify: two flags; app: web UI)
            continue
        for key, action in config_actions(leaf).items():
            if action.help == argparse.SUPPRESS:
                continue  # old spellings: accepted too, with a deprecation message (below)
            raw, expected = _sample(action)
            data = {**LATE.get(names, {}), key.replace("-", "_"): raw}
            config = tmp_path / "config.yaml"
            config.write_text(yaml.safe_dump(data))
            argv = [*names, *NEEDS.get(names, []), "--config", str(config)]
            args = apply_config_file(parser, parser.parse_args(argv), argv)
            assert getattr(args, action.dest) == expected, (names, key)
            checked += 1
    assert checked > 200


def test_config_file_gives_weights_dir_and_device_and_flags_win(tmp_path):
    parser = build_parser()
    config = tmp_path / "c.toml"
    config.write_text('weights-dir = "/w"\ndevice = "cpu"\n[swap]\nsteps = 4\nsize = 64\nlora = "my.safetensors"\n'
                      'weights_dir = "/ws"\n')
    argv = ["swap", "-s", "a.jpg", "-t", "b.jpg", "-o", "c.jpg", "--config", str(config), "--size", "128"]
    args = apply_config_file(parser, parser.parse_args(argv), argv)
    # the [swap] section is used; its keys are the flags' names in either spelling
    assert (args.weights_dir, args.device, args.steps, args.size, args.lora) == ("/ws", None, 4, 128,
                                                                                 "my.safetensors")
    config.write_text("frames = 3\n")
    with pytest.raises(ValueError, match="unknown key 'frames'.*allowed"):
        apply_config_file(parser, parser.parse_args(argv), argv)


def test_required_options_may_come_from_the_config_file(tmp_path, capsys):
    parser = build_parser()
    config = tmp_path / "c.yaml"
    config.write_text("source: [a.jpg, b.jpg]\ntarget: t.mp4\noutput: o.mp4\n")
    argv = ["swap", "--config", str(config)]
    args = apply_config_file(parser, parser.parse_args(argv), argv)
    assert (args.source, args.target, args.output) == (["a.jpg", "b.jpg"], "t.mp4", "o.mp4")
    with pytest.raises(SystemExit):
        apply_config_file(parser, parser.parse_args(["swap", "-s", "a.jpg"]), ["swap", "-s", "a.jpg"])
    assert "-t/--target" in capsys.readouterr().err


@pytest.mark.parametrize(("argv", "dest", "value", "new"), [
    (["generate", "--num-steps", "7"], "num_steps", 7, "--steps"),
    (["generate", "--mode", "teacher"], "mode", "teacher", "--model"),
    (["pseudo", "--resolution", "64"], "size", 64, "--size"),
    (["pseudo", "--teacher", "t.safetensors"], "teacher", "t.safetensors", "--lora"),
    (["train", "teacher", "--output-dir", "runs/x"], "output_dir", "runs/x", "--output"),
    (["train", "teacher", "--mixed-precision", "no"], "mixed_precision", "fp32", "--dtype"),
    (["eval", "--out", "rep"], "out", "rep", "--output"),
    (["bench", "--batch", "2"], "batch", 2, "--batch-size"),
    (["prepare-ids", "DATA", "--cache", "ids"], "cache", "ids", "--output"),
])
def test_old_spellings_still_work_with_a_deprecation_message(argv, dest, value, new, capsys):
    from appleswap import config

    config._warned.clear()
    args = build_parser().parse_args(argv)
    assert getattr(args, dest) == value
    err = capsys.readouterr().err
    assert "deprecated" in err and new in err


def test_old_config_keys_still_work(tmp_path, capsys):
    from appleswap import config as config_module
    from appleswap.config import resolve_config
    from appleswap.train.config import PseudoConfig

    config_module._warned.clear()
    parser = build_parser()
    path = tmp_path / "pseudo.yaml"
    path.write_text("num_steps: 5\nmixed_precision: bfloat16\noutput_dir: out\n")
    argv = ["pseudo", "--config", str(path)]
    resolved = resolve_config(PseudoConfig, apply_config_file(parser, parser.parse_args(argv), argv))
    assert (resolved.num_steps, resolved.mixed_precision, resolved.output_dir) == (5, "bf16", "out")
    assert capsys.readouterr().err.count("deprecated") == 4  # three keys and one dtype spelling


def test_python_m_bench_usage_names_the_command_once(capsys):
    from appleswap.benchmark.__main__ import main as bench_main

    with pytest.raises(SystemExit) as exit_info:
        bench_main(["--help"])
    assert exit_info.value.code == 0
    usage = capsys.readouterr().out.splitlines()[0]
    assert usage.startswith("usage: python -m appleswap.benchmark [") and "bench bench" not in usage


def test_bad_config_file_is_one_line_exit_2(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("steps: many\n")
    assert main(["generate", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "config key 'steps'" in err and len(err.strip().splitlines()) == 1
