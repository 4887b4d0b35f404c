"""``python -m appleswap.benchmark``: the ``appleswap bench`` command without loading the other subcommands."""

import argparse
import sys

from appleswap.benchmark.cli import DESCRIPTION, configure_parser
from appleswap.cli_common import HelpFormatter, common_parser, setup_logging

parser = configure_parser(argparse.ArgumentParser(prog="python -m appleswap.benchmark", parents=[common_parser()],
                                                  formatter_class=HelpFormatter, description=DESCRIPTION))
args = parser.parse_args()
setup_logging(args.log_level)
sys.exit(args.func(args))
