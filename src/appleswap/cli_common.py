"""Options every subcommand shares, and small helpers for command modules.

A command module exposes ``add_parser(subparsers)`` (registering its parser with ``set_defaults(func=run)``)
and ``run(args) -> int``. Modules keep heavy imports (torch, diffusers) inside ``run`` so ``--help`` is fast.
``parse_command_line`` parses and then fills, from ``--config FILE``, every flag not given on the command line:
config keys are the flags' names (``weights-dir`` or ``weights_dir``), in a section named after the command
(``[swap]``, ``[prepare_ids]``, ``[teacher]``) or at the top level.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from typing import Any

LOG_LEVELS = ("debug", "info", "warning", "error")

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
    group.add_argument("--log-level", default="warning", choices=list(LOG_LEVELS),
                       help="info also logs what each stage loads and does; debug adds the native libraries' logs")
    group.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="progress bars on stderr (default: when stderr is a terminal)")
    return parser


def setup_logging(level: str = "warning") -> None:
    """Our log records at ``level``; third-party libraries' Python loggers at warning or above (their info is
    noise here), native libraries' stderr routed to the ``appleswap.native`` logger (``native_logs``)."""
    from appleswap.native_logs import quiet_libraries

    quiet_libraries()
    numeric = getattr(logging, level.upper())
    logging.basicConfig(level=numeric, format="%(levelname)s %(name)s: %(message)s", force=True)
    for name in ("absl", "httpx", "urllib3", "PIL", "matplotlib", "h5py", "filelock", "torch", "diffusers",
                 "transformers", "accelerate", "huggingface_hub"):
        logging.getLogger(name).setLevel(max(numeric, logging.WARNING))


def progress_enabled(args: argparse.Namespace) -> bool:
    """``--progress`` / ``--no-progress`` if given, else whether stderr is a terminal (no bars in log files)."""
    choice = getattr(args, "progress", None)
    return sys.stderr.isatty() if choice is None else bool(choice)


def late_required(parser: argparse.ArgumentParser, *flags: str, group: Any = None, **kwargs: Any) -> argparse.Action:
    """An option that is required but may come from ``--config`` (checked by ``parse_command_line``)."""
    action = (group or parser).add_argument(*flags, **kwargs)
    parser.__dict__.setdefault("late_required", []).append(action)
    return action


def _leaf(parser: argparse.ArgumentParser, args: argparse.Namespace, argv: list[str]):
    """The (sub)parser that parsed the command, the command names on the way, and the arguments after them."""
    names: list[str] = []
    tail = list(argv)
    while True:
        subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
        chosen = getattr(args, subs[0].dest, None) if subs and subs[0].dest != argparse.SUPPRESS else None
        if not subs or chosen is None:
            return parser, names, tail
        tail = tail[tail.index(chosen) + 1:]
        names.append(chosen)
        parser = subs[0].choices[chosen]


def _section(data: dict, names: list[str]) -> dict:
    """The command's section of a config file (the deepest of ``[train]``/``[teacher]`` that exists), else the
    file's top-level values (other commands' sections left out)."""
    for name in reversed(names):
        section = data.get(name, data.get(name.replace("-", "_")))
        if isinstance(section, dict):
            return section
    return {k: v for k, v in data.items() if not isinstance(v, dict)}


def config_actions(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    """Config key (a flag without dashes, dash form) -> the action it sets, for every option of ``parser``."""
    keys: dict[str, argparse.Action] = {}
    for action in parser._actions:
        if isinstance(action, (argparse._HelpAction, argparse._VersionAction, argparse._SubParsersAction)):
            continue
        for option in action.option_strings:
            negative = isinstance(action, argparse.BooleanOptionalAction) and option.startswith("--no-")
            if option.startswith("--") and option != "--config" and not negative:
                keys.setdefault(option[2:], action)
    return keys


def _config_value(action: argparse.Action, key: str, value: Any) -> Any:
    """A config file's value for ``action``, converted and checked as argparse would the flag's."""
    from appleswap.config import DeprecatedFlag, deprecated

    if isinstance(action, DeprecatedFlag):
        deprecated(f"config key {key!r}", repr(action.new.lstrip("-")))
    if action.nargs == 0 and not isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected true or false, got {value!r}")
        return action.const if value else action.default
    if isinstance(action, argparse.BooleanOptionalAction):
        if not isinstance(value, bool):
            raise ValueError(f"config key {key!r}: expected true or false, got {value!r}")  # noqa: TRY004
        return value
    many = action.nargs in ("+", "*") or isinstance(action.nargs, int)
    items = value if isinstance(value, list) else [value]
    if action.type is not None:
        try:
            items = [action.type(v) if isinstance(v, str) else v for v in items]
        except (TypeError, ValueError, argparse.ArgumentTypeError) as error:
            raise ValueError(f"config key {key!r}: {value!r} is not a valid value ({error})") from error
    if action.choices is not None and any(v not in action.choices for v in items):
        raise ValueError(f"config key {key!r}: {value!r} is not one of {list(action.choices)}")
    return items if many else items[0]


def apply_config_file(parser: argparse.ArgumentParser, args: argparse.Namespace,
                      argv: list[str]) -> argparse.Namespace:
    """Fill, from ``args.config``, every option of the chosen command that the command line did not give."""
    from appleswap.config import load_config_file

    leaf, names, tail = _leaf(parser, args, argv)
    if getattr(args, "config", None):
        data = _section(load_config_file(args.config), names)
        keys = config_actions(leaf)
        preset = argparse.Namespace()
        for key, value in data.items():
            action = keys.get(str(key).replace("_", "-"))
            if action is None:
                allowed = sorted(k for k, a in keys.items() if a.help != argparse.SUPPRESS)
                raise ValueError(f"config file {args.config}: unknown key {key!r} for `appleswap "
                                 f"{' '.join(names)}`; allowed: {allowed}")
            setattr(preset, action.dest, _config_value(action, str(key), value))
        reparsed = leaf.parse_args(tail, namespace=preset)  # flags win over the file's values
        for key, value in vars(reparsed).items():
            setattr(args, key, value)
        args.config = None  # applied: the command's own resolve_config must not read it again
    for action in leaf.__dict__.get("late_required", []):
        if getattr(args, action.dest, None) is None:
            leaf.error(f"the following arguments are required: {'/'.join(action.option_strings)} "
                       f"(or the config key {action.option_strings[-1].lstrip('-')!r})")
    return args


def parse_command_line(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> argparse.Namespace:
    """``parser.parse_args`` plus the config file's values for flags not given (``apply_config_file``); a bad
    config file is a usage error (exit 2, one line)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    try:
        return apply_config_file(parser, args, argv)
    except (FileNotFoundError, ValueError, argparse.ArgumentTypeError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")


BLAS_WORKSPACE_ENV = "CUBLASLT_WORKSPACE_SIZE"


def inference_blas_defaults() -> None:
    """cuBLASLt without a workspace for the inference commands, unless the user set ``CUBLASLT_WORKSPACE_SIZE``.

    Why: with a workspace, cuBLASLt picks H100 GEMM algorithms that run a memset before each call (76 per bf16 pass,
    190 per fp8 pass, each a node and a gap in the CUDA graph). Without one the graphed pass ran 0.3 ms (bf16) and
    1.1 ms (fp8) faster (``benchmarks/RESULTS.md``, round 9). PyTorch reads the variable at its first
    cuBLASLt call, so this runs before any CUDA work. Training keeps PyTorch's default."""
    os.environ.setdefault(BLAS_WORKSPACE_ENV, "0")

