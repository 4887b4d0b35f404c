"""The one ``appleswap`` entry point: each subcommand calls one stage's public function."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys
import traceback

from appleswap import __version__
from appleswap.cli_common import (
    EXIT_INTERRUPTED,
    EXIT_NOTHING,
    EXIT_STATUS_HELP,
    HelpFormatter,
    apply_config_file,
    inference_blas_defaults,
    setup_logging,
    with_exit_status_help,
)
from appleswap.native_logs import quiet_libraries

# subcommand modules in pipeline order; each exposes add_parser(subparsers) and run(args) -> int
COMMAND_MODULES = (
    "appleswap.weights",  # weights: check / list the registry
    "appleswap.preprocess.cli",  # preprocess: photos -> teacher-ready dataset
    "appleswap.identity.cli",  # prepare-ids / identity: PuLID ID tokens
    "appleswap.generate",  # generate: swaps over preprocessed pairs
    "appleswap.app.swap",  # swap: any photo, folder or video
    "appleswap.app.verify_cli",  # verify: provenance + watermark check
    "appleswap.app.web",  # app: web UI
    "appleswap.train.cli",  # train teacher|student
    "appleswap.train.pseudo",  # pseudo: pseudo-triplets from the teacher
    "appleswap.eval.cli",  # eval: the FFHQ protocol and reports
    "appleswap.benchmark.cli",  # bench: GPU speed and memory table
)
INFERENCE_COMMANDS = ("generate", "swap", "app", "pseudo", "eval", "bench")  # see inference_blas_defaults


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appleswap",
        description=(
            "APPLE face swapping on FLUX + PuLID: preprocess photos, swap faces, train teacher and student, "
            "evaluate.\nWeights load from --weights-dir or $APPLESWAP_HOME; `appleswap weights check` lists them."
        ),
        formatter_class=HelpFormatter,
        epilog=EXIT_STATUS_HELP,
    )
    parser.add_argument("--version", action="version", version=f"appleswap {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).add_parser(subparsers)
    _add_exit_status_help(subparsers)
    return parser


def _add_exit_status_help(subparsers: argparse._SubParsersAction) -> None:
    """Every subcommand's --help ends with the one shared exit-status rule (nested subcommands too)."""
    for sub in dict.fromkeys(subparsers.choices.values()):
        sub.epilog = with_exit_status_help(sub.epilog)
        for action in sub._actions:
            if isinstance(action, argparse._SubParsersAction):
                _add_exit_status_help(action)


def main(argv: list[str] | None = None) -> int:
    quiet_libraries()  # before any command module imports a library that reads its log settings at import
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        args = apply_config_file(parser, args, argv)  # --config FILE: values for the flags not given
    except (FileNotFoundError, ValueError) as error:
        print(f"appleswap {args.command}: error: {error}", file=sys.stderr)
        return 2
    setup_logging(getattr(args, "log_level", "warning"))
    if args.command in INFERENCE_COMMANDS:
        inference_blas_defaults()
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("appleswap: interrupted; finished outputs are kept, run the same command again to resume",
              file=sys.stderr)
        return EXIT_INTERRUPTED
    except SystemExit as stop:  # a command's own usage stop: its message, the shared code
        if stop.code is None or isinstance(stop.code, int):
            return int(stop.code or 0)
        print(stop.code, file=sys.stderr)
        return EXIT_NOTHING
    except Exception as error:  # noqa: BLE001  (the one place an error meets the user: one line, no traceback)
        if getattr(args, "log_level", "info") == "debug":
            traceback.print_exc()
        print(error_line(args.command, error), file=sys.stderr)
        return EXIT_NOTHING


def error_line(command: str, error: BaseException) -> str:
    """The user's one-line message: the environment fault (path and cause), the bad input, or a labelled bug."""
    from appleswap.files import environment_fault

    fault = environment_fault(error)
    if fault is not None:
        return f"appleswap {command}: error: {fault}"
    if isinstance(error, (FileNotFoundError, ValueError, NotADirectoryError, IsADirectoryError)):
        return f"appleswap {command}: error: {error}"
    if isinstance(error, OSError):
        where = f"{error.filename}: " if error.filename else ""
        return f"appleswap {command}: error: {where}{error.strerror or error}"
    return (f"appleswap {command}: internal error: {type(error).__name__}: {error} "
            "(run again with --log-level debug for the traceback, and please report it)")


if __name__ == "__main__":
    sys.exit(main())
