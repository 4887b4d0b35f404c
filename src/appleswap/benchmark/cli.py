"""``appleswap bench``: the command's parser and entry. The table itself is :mod:`appleswap.benchmark.table`,
imported when the command runs so that ``appleswap --help`` does not load torch."""

from __future__ import annotations

import argparse

from appleswap.benchmark.settings import BenchConfig
from appleswap.cli_common import HelpFormatter, common_parser, inference_blas_defaults
from appleswap.config import add_config_args, load_config_file, resolve_config
from appleswap.files import save_json

DESCRIPTION = """One table of GPU speed and memory for APPLE on the full FLUX.1 architecture.

Random weights, built directly on the device in bf16 (no downloads): the three-branch forward (512 text + 1024
image + 1024 condition tokens, 20 ID cross-attentions, r64 LoRA), the plain diffusers forward over the same
token count, student swap (28 passes), teacher swap with inversion (56 passes), batched images/s, one LoRA
training step (gradient checkpointing) with peak memory, FLOPs per pass and the fraction of a bf16 matmul
ceiling measured in the same run. ``--tiny --device cpu`` runs the same code on a tiny config.

Example:
  appleswap bench --compile --output bench.json"""


def configure_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    add_config_args(parser.add_argument_group("bench options"), BenchConfig)
    parser.set_defaults(func=run)
    return parser


def add_parser(subparsers) -> None:
    configure_parser(subparsers.add_parser("bench", parents=[common_parser()], formatter_class=HelpFormatter,
                                           help="GPU speed and memory table (random full-size weights)",
                                           description=DESCRIPTION))


def run(args: argparse.Namespace) -> int:
    inference_blas_defaults()  # also under ``python -m appleswap.benchmark``, before any CUDA work
    from appleswap.benchmark.table import environment, run_bench  # torch: only when the command runs
    from appleswap.devices import pick_device

    cfg = resolve_config(BenchConfig, args, load_config_file(args.config))
    device = pick_device(args.device)
    rows = run_bench(cfg, device)
    header = f"appleswap bench on {environment(device)} ({'tiny' if cfg.tiny else 'full FLUX.1'} config)"
    print(header)
    print(rows.table())
    if cfg.output is not None:
        save_json(cfg.output, {"environment": header, "rows": [list(r) for r in rows.rows]})
    return 0
