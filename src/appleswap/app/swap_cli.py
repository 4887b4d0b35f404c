"""``appleswap swap -s SOURCE... -t TARGET -o OUTPUT``: swap a face into any photo, folder or video.

Vocabulary from roop / FaceFusion: one or more source photos (their identity is averaged) or a saved identity
``.safetensors``; a target photo, folder or video; an output file or folder (folder outputs are named by
``--output-pattern``). Faces are detected, aligned, generated at the model's size and pasted back with a
feathered mask, so nothing outside the face changes (except the invisible watermark, ``--no-watermark``).
A target that fails (no face, corrupt file) is reported and the rest of the batch is still done.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from appleswap.cli_common import HelpFormatter, common_parser, late_required, progress_enabled

log = logging.getLogger(__name__)
EPILOG = """examples:
  appleswap swap -s me.jpg -t group.jpg -o out.jpg --face-selector-order left-right --face-position 1
  appleswap swap -s me1.jpg me2.jpg -t photos/ -o swapped/ --output-pattern "{target}_swapped{ext}"
  appleswap swap -s me.safetensors -t clip.mp4 -o clip_swapped.mp4 --face-selector reference --reference-face them.jpg
  appleswap swap -s me.jpg -t target.jpg -o out.png --model teacher --id-guidance-scale 1.5
"""


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from appleswap.app.swapper import SwapConfig
    from appleswap.config import add_config_args

    parser = subparsers.add_parser("swap", parents=[common_parser()], help="swap a face into photos, folders, videos",
                                   description=__doc__, epilog=EPILOG, formatter_class=HelpFormatter)
    io = parser.add_argument_group("inputs and outputs")
    late_required(parser, "-s", "--source", nargs="+", metavar="SOURCE", group=io,
                  help="source photo(s) of one person, or an identity .safetensors (appleswap identity)")
    late_required(parser, "-t", "--target", group=io, help="target photo, video, or folder of them")
    late_required(parser, "-o", "--output", group=io, help="output file, or folder (named by --output-pattern)")
    add_config_args(parser.add_argument_group("swap options (config file section [swap])"), SwapConfig)
    parser.set_defaults(func=run)


def plan_jobs(target: Path, output: Path, sources: list[str], pattern: str) -> list[tuple[Path, Path]]:
    """(target, output) pairs: a folder target maps every photo/video in it to the output folder."""
    from appleswap.app.naming import check_pattern, output_name
    from appleswap.app.video import is_video_path
    from appleswap.files import is_image_path

    check_pattern(pattern)
    if not target.exists():
        raise FileNotFoundError(f"-t/--target {target}: no such file or folder")
    if target.is_dir():
        items = sorted(p for p in target.iterdir() if p.is_file() and (is_image_path(p) or is_video_path(p)))
        if not items:
            raise ValueError(f"-t/--target {target}: no photos or videos in this folder")
        if output.suffix and not output.is_dir():
            raise ValueError(f"-o/--output {output}: a folder target needs an output folder, not a file name")
        return [(item, output / output_name(pattern, sources[0], item, i, video=is_video_path(item)))
                for i, item in enumerate(items)]
    if not (is_image_path(target) or is_video_path(target)):
        raise ValueError(f"-t/--target {target}: unsupported file type {target.suffix!r}")
    if output.is_dir() or not output.suffix:
        return [(target, output / output_name(pattern, sources[0], target, video=is_video_path(target)))]
    if is_video_path(target) and output.suffix.lower() != ".mp4":
        raise ValueError(f"-o/--output {output}: video outputs are written as .mp4")
    return [(target, output)]


def check_sources(sources: list[str]) -> None:
    for source in sources:
        if not Path(source).is_file():
            raise FileNotFoundError(f"-s/--source {source}: no such file")


def run_jobs(engine, identity, sources: list[str], jobs: list[tuple[Path, Path]], progress: bool) -> list[dict]:
    """Run every job; a failing target becomes an error record and the batch goes on."""
    from tqdm import tqdm

    from appleswap.app.video import is_video_path
    from appleswap.files import raise_if_environment

    results = []
    for target, output in tqdm(jobs, desc="targets", unit="file", disable=not progress or len(jobs) < 2):
        engine.show_steps(progress and not is_video_path(target))  # videos: one bar over their frames
        try:
            if is_video_path(target):
                result = engine.swap_video_file(identity, sources, target, output, progress=progress)
                if result.get("frames_swapped") == 0:  # as a photo without a face: a failed target, no output
                    output.unlink(missing_ok=True)
                    raise ValueError(f"{target}: no face was swapped in any frame")
            else:
                result = engine.swap_image_file(identity, sources, target, output)
        except (ValueError, FileNotFoundError) as error:  # a bad target; faults of the machine stop the batch
            raise_if_environment(error, output)
            log.error("%s", error)
            result = {"target": str(target), "status": "error", "error": str(error)}
        except OSError as error:  # disk full, no permission...: stop the batch with the path and the cause
            raise_if_environment(error, output)
            raise
        results.append(result)
    return results


def use_lora(config) -> None:
    """``--lora PATH``: the file stands in for the model's registry LoRA (its ``APPLESWAP_WEIGHT_*`` override),
    so the weights check before loading looks for it instead of the released one."""
    import os

    from appleswap.weights import env_override_name

    if config.lora:
        if not Path(config.lora).is_file():
            raise FileNotFoundError(f"--lora {config.lora}: no such file")
        os.environ[env_override_name(f"apple_{config.model}")] = str(Path(config.lora).expanduser())


def run(args: argparse.Namespace) -> int:
    from appleswap.app.engine import SwapEngine
    from appleswap.app.swapper import SwapConfig, swap_section
    from appleswap.cli_common import exit_status
    from appleswap.config import load_config_file, resolve_config
    from appleswap.parity import apply_parity

    config = apply_parity(resolve_config(SwapConfig, args, swap_section(load_config_file(args.config))), "swap")
    config = config.check()
    if config.face_selector == "reference" and not config.reference_face:
        raise ValueError("--face-selector reference needs --reference-face PHOTO")
    check_sources(args.source)
    jobs = plan_jobs(Path(args.target), Path(args.output), args.source, config.output_pattern)
    use_lora(config)
    engine = SwapEngine.load(config, args.weights_dir, args.device)
    identity = engine.source_identity(args.source)
    results = run_jobs(engine, identity, args.source, jobs, progress=progress_enabled(args))
    done = [r for r in results if r["status"] == "ok"]
    for result in results:
        if result["status"] == "ok":
            print(f"{result['target']} -> {result['output']}" + (f": {result['summary']}" if "summary" in result else ""))
        else:
            print(f"{result['target']}: FAILED: {result['error']}")
    print(f"appleswap swap: {len(done)} of {len(results)} done; outputs are labelled AI-generated"
          + (" and watermarked" if config.watermark else ""))
    return exit_status(len(done), len(results) - len(done))
