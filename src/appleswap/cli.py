"""The one ``appleswap`` entry point: each subcommand calls one stage's public function."""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys

from appleswap import __version__
from appleswap.cli_common import HelpFormatter, apply_config_file, inference_blas_defaults, setup_logging
from appleswap.native_logs import quiet_libraries

# subcommand modules in pipeline order; each exposes add_parser(subparsers) and run(args) -> int
COMMAND_MODULES = (
    "appleswap.weights",  # weights: check / list the registry
    "appleswap.preprocess.cli",  # preprocess: photos -> teacher-ready dataset
    "appleswap.identity.cli",  # prepare-ids / identity: PuLID ID tokens
    "appleswap.generate",  # generate: swaps over preprocessed pairs
    "appleswap.app.swap_cli",  # swap: any photo, folder or video
    "appleswap.app.verify_cli",  # verify: provenance + watermark check
    "appleswap.app.web",  # app: web UI
    "appleswap.train.cli",  # train teacher|student
    "appleswap.train.pseudo",  # pseudo: pseudo-triplets from the teacher
    "appleswap.eval.cli",  # eval: the FFHQ protocol and reports
    "appleswap.bench",  # bench: GPU speed and memory table
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
    )
    parser.add_argument("--version", action="version", version=f"appleswap {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        if importlib.util.find_spec(name) is None:
            continue
        importlib.import_module(name).add_parser(subparsers)
    return parser


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
        return 130
    except (FileNotFoundError, ValueError) as error:
        if getattr(args, "log_level", "info") == "debug":
            raise
        print(f"appleswap {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
