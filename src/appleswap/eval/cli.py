"""``appleswap eval``: score a folder of swaps on a pair list; ``appleswap eval compare A.json B.json``."""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from appleswap.cli_common import HelpFormatter, common_parser
from appleswap.config import add_config_args, load_config_file, resolve_config

log = logging.getLogger(__name__)


def add_parser(subparsers) -> None:
    from appleswap.eval.settings import EvalConfig

    parser = subparsers.add_parser(
        "eval", parents=[common_parser()], formatter_class=HelpFormatter,
        help="score swaps: ID similarity/retrieval, pose, expression, gaze, skin, lighting, FID/KID",
        description=(
            "Score swapped faces against their sources and targets (FFHQ protocol: --pairs ffhq, 1,000 pairs).\n"
            "Writes <output>/report.json (every number with a 95% bootstrap interval) and <output>/report.html.\n"
            "A pair with an unreadable or too small image is excluded and listed with its reason; a missing swap\n"
            "counts as a failure (ID similarity 0, retrieval miss). Retrieval is in % everywhere.\n"
            "Missing weights switch a metric to an embedded fallback, named in the report.\n"
            "  appleswap eval --pairs ffhq --sources FFHQ/images512 --targets FFHQ/images512 --swapped out/ "
            "--reference FFHQ/images512\n  appleswap eval compare runA/report.json runB/report.json"),
    )
    parser.add_argument("action", nargs="?", choices=["run", "compare", "flicker"], default="run",
                        help="run (default): score a swap folder; compare: test two report.json files; "
                             "flicker: temporal flicker of a swapped video (optionally against its target video)")
    parser.add_argument("reports", nargs="*", help="compare: A.json B.json; flicker: SWAPPED.mp4 [TARGET.mp4]")
    add_config_args(parser, EvalConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.action == "compare":
        return _compare(args)
    if args.action == "flicker":
        return _flicker(args)
    from appleswap.cli_common import exit_status
    from appleswap.devices import pick_device
    from appleswap.eval.networks import WeightPaths
    from appleswap.eval.report_html import render_html
    from appleswap.eval.runner import evaluate
    from appleswap.eval.settings import EvalConfig
    from appleswap.files import save_json, write_text_atomic

    config = resolve_config(EvalConfig, args, load_config_file(getattr(args, "config", None)))
    if not config.swapped:
        raise SystemExit("appleswap eval: --swapped is required (the folder of swapped images)")
    device = pick_device(getattr(args, "device", None))
    paths = WeightPaths(getattr(args, "weights_dir", None), config.irse50, config.glint, config.hopenet,
                        config.deep3d, config.inception)
    report = evaluate(config, paths, device)
    out = Path(config.out)
    save_json(out / "report.json", report)
    write_text_atomic(out / "report.html", render_html(report, config.grid))
    _print_summary(report)
    print(f"wrote {out / 'report.json'} and {out / 'report.html'}")
    return exit_status(report["pairs"], len(report["excluded"]))


def _print_summary(report: dict) -> None:
    print(f"{report['pairs']} of {report['pairs_listed']} pairs scored, {report['swaps_found']} swaps found"
          + (f"; {report['missing_swaps']} missing swaps count as failures (ID similarity 0, retrieval miss)"
             if report["missing_swaps"] else ""))
    for name, entry in report["metrics"].items():
        if entry.get("mean") is None:
            print(f"  {name:<28} -   {entry.get('note', '')}")
            continue
        interval = f"[{entry['ci_low']:.4f}, {entry['ci_high']:.4f}]" if entry.get("ci_low") is not None else ""
        print(f"  {name:<28} {entry['mean']:.4f} {entry.get('unit', ''):<8} {interval}")
    if report.get("fallbacks"):
        print(f"  fallbacks used: {', '.join(report['fallbacks'])}")
    for row in report["excluded"]:
        print(f"  EXCLUDED pair {row['id']}: {row['reason']}")


def _compare(args: argparse.Namespace) -> int:
    from appleswap.eval.compare import compare_reports, format_comparison, load_report

    if len(args.reports) != 2:
        raise SystemExit("appleswap eval compare: give exactly two report.json files")
    a, b = (load_report(p) for p in args.reports)
    print(format_comparison(compare_reports(a, b), Path(args.reports[0]).parent.name or "A",
                            Path(args.reports[1]).parent.name or "B"))
    return 0


def _flicker(args: argparse.Namespace) -> int:
    from appleswap.eval.flicker import video_flicker
    from appleswap.eval.stats import bootstrap_mean

    if len(args.reports) not in (1, 2):
        raise SystemExit("appleswap eval flicker: give SWAPPED.mp4 and optionally TARGET.mp4")
    scores = video_flicker(*args.reports)
    summary = bootstrap_mean(scores)
    print(f"flicker (L* per frame, face region): {summary['mean']:.4f} [{summary['ci_low']:.4f}, "
          f"{summary['ci_high']:.4f}] over {summary['n']} transitions")
    return 0
