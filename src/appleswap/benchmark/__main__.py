"""``python -m appleswap.benchmark``: the ``appleswap bench`` command without loading the other subcommands."""

from __future__ import annotations

import argparse
import sys

from appleswap.benchmark.cli import DESCRIPTION, configure_parser
from appleswap.cli_common import HelpFormatter, common_parser, parse_command_line, setup_logging


def main(argv: list[str] | None = None) -> int:
    parser = configure_parser(argparse.ArgumentParser(prog="python -m appleswap.benchmark",
                                                      parents=[common_parser()], formatter_class=HelpFormatter,
                                                      description=DESCRIPTION))
    args = parse_command_line(parser, argv)
    setup_logging(args.log_level)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
