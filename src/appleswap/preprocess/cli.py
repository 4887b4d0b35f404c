"""``appleswap preprocess INPUT OUTPUT``: photos -> a teacher-ready dataset in the reference layout."""

from __future__ import annotations

import argparse

from appleswap.cli_common import HelpFormatter, common_parser, progress_enabled

EXAMPLES = """\
examples:
  appleswap preprocess examples/faces out/demo --face-selector all --preview
  appleswap preprocess vggface2_hq/ data/vgg --aligned --workers 8 --parser auto --occlusion auto --aesthetic
  appleswap preprocess data/vgg data/vgg --aligned --landmarks reference      # reuse the authors' 3dmm/ + iris/

INPUT is a folder of photos, a flat folder of aligned faces, or an identity tree <identity>/<name>.jpg.
Killed runs resume where they stopped: run the same command again. Per-file errors (bad inputs) go to
OUTPUT/manifest.json and are not retried; a fault of the machine (disk full, permission) stops the run and the
next run retries the file it hit.
"""


def add_parser(subparsers) -> None:
    from appleswap.config import add_config_args
    from appleswap.preprocess.runner import PreprocessConfig

    parser = subparsers.add_parser(
        "preprocess", parents=[common_parser()], formatter_class=HelpFormatter, epilog=EXAMPLES,
        help="photos -> aligned faces, landmarks, iris, masks and teacher conditions",
        description="Detect, align (FFHQ), find 68 landmarks + iris, build face masks and the APPLE condition "
        "images for every face under INPUT, written to OUTPUT in the reference dataset layout.",
    )
    parser.add_argument("input", help="folder of photos / aligned faces / identity sub-folders")
    parser.add_argument("output", help="dataset folder to write (created; resumable)")
    add_config_args(parser.add_argument_group("preprocessing"), PreprocessConfig)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from appleswap.config import load_config_file, resolve_config
    from appleswap.preprocess.runner import PreprocessConfig, run_preprocess

    file_data = load_config_file(args.config)
    if isinstance(file_data.get("preprocess"), dict):  # a shared config file: use its [preprocess] section
        file_data = file_data["preprocess"]
    config = resolve_config(PreprocessConfig, args, file_data)
    summary = run_preprocess(args.input, args.output, config, progress=progress_enabled(args),
                             weights_dir=args.weights_dir, device=args.device)
    from appleswap.cli_common import exit_status

    print(json.dumps({k: v for k, v in summary.items() if k != "failed"}, indent=2))
    failed = summary["failed"]
    for line in failed[:20]:
        print(f"FAILED: {line}")
    if failed:
        more = " (first 20 shown)" if len(failed) > 20 else ""
        print(f"{len(failed)} input(s) failed{more}; see {args.output}/manifest.json (records with status 'error')")
    done = summary["finished"] - len(failed)
    return exit_status(done, len(failed))
