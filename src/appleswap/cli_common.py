"""Options every subcommand shares, and small helpers for command modules.

A command module exposes ``add_parser(subparsers)`` (registering its parser with ``set_defaults(func=run)``)
and ``run(args) -> int``. Modules keep heavy imports (torch, diffusers) inside ``run`` so ``--help`` is fast.
"""

from __future__ import annotations

import argparse
import logging
import os

EXIT_OK, EXIT_PARTIAL, EXIT_NOTHING = 0, 1, 2
EXIT_INTERRUPTED = 130
EXIT_STATUS_HELP = """\
exit status (every appleswap command):
  0  all done
  1  some items failed (bad or unreadable inputs, no face): the rest are written; the summary lists the failures
  2  nothing done, a usage error, or the run stopped on a fault of the machine (disk full, no permission,
     read-only folder, missing device): the message names the path and the cause; finished outputs are kept
     and running the same command again retries what was not done
  130 interrupted (Ctrl-C); run the same command again to resume
"""


def exit_status(done: int, failed: int) -> int:
    """The shared rule: 0 when nothing failed, 1 when some items failed but others were done, 2 when none was done.

    ``done`` counts finished items (including ones finished by an earlier run), ``failed`` the bad inputs."""
    if failed == 0 and done > 0:
        return EXIT_OK
    return EXIT_PARTIAL if done > 0 else EXIT_NOTHING


def with_exit_status_help(epilog: str | None) -> str:
    """``epilog`` followed by the shared exit-status text (once)."""
    epilog = (epilog or "").rstrip("\n")
    if EXIT_STATUS_HELP in epilog:
        return epilog
    return f"{epilog}\n\n{EXIT_STATUS_HELP}" if epilog else EXIT_STATUS_HELP


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Shows defaults and keeps the description's line breaks (for examples)."""


def common_parser() -> argparse.ArgumentParser:
    """Parent parser with ``--config``, ``--weights-dir``, ``--device`` and ``--log-level``."""
    parser = argparse.ArgumentParser(add_help=False)
    group = parser.add_argument_group("common")
    group.add_argument("--config", default=None, help="YAML/TOML file whose keys mirror the flags; flags override it")
    group.add_argument(
        "--weights-dir",
        default=None,
        help="folder holding model weights (default: $APPLESWAP_HOME, else ~/.cache/appleswap); "
        "see `appleswap weights check`",
    )
    group.add_argument("--device", default=None, help="torch device, e.g. cuda, cuda:1, cpu (default: cuda if available)")
    group.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(level=getattr(logging, level.upper()), format="%(levelname)s %(name)s: %(message)s")


BLAS_WORKSPACE_ENV = "CUBLASLT_WORKSPACE_SIZE"


def inference_blas_defaults() -> None:
    """cuBLASLt without a workspace for the inference commands, unless the user set ``CUBLASLT_WORKSPACE_SIZE``.

    Why: with a workspace, cuBLASLt picks H100 GEMM algorithms that run a memset before each call (76 per bf16 pass,
    190 per fp8 pass, each a node and a gap in the CUDA graph). Without one the graphed pass ran 0.3 ms (bf16) and
    1.1 ms (fp8) faster (``benchmarks/RESULTS.md``, round 9). PyTorch reads the variable at its first
    cuBLASLt call, so this runs before any CUDA work. Training keeps PyTorch's default."""
    os.environ.setdefault(BLAS_WORKSPACE_ENV, "0")

