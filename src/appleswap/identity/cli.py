"""CLI: ``appleswap prepare-ids`` (ID-token cache for a dataset) and ``appleswap identity`` (one identity file)."""

from __future__ import annotations

import argparse
import dataclasses

from appleswap.cli_common import HelpFormatter, common_parser, late_required, progress_enabled
from appleswap.config import Dtype, add_alias, add_config_args, load_config_file, option, resolve_config, torch_dtype

PREPARE_EXAMPLES = """examples:
  appleswap prepare-ids data/vgg512 -o cache/vgg512_ids
  torchrun --nproc_per_node=4 -m appleswap.identity.cli prepare-ids data/vgg512 -o cache/vgg512_ids
  appleswap prepare-ids data/vgg512 -o ids --shard-index 1 --num-shards 8 --kinds masked

Killed runs resume: run the same command again. Released pulid_id/ and masked_pulid_id/ .npy files are
imported instead of recomputed (--no-import-npy recomputes them). Options can come from --config FILE
(section [prepare_ids]); flags win.
"""

IDENTITY_EXAMPLES = """examples:
  appleswap identity -s me1.jpg me2.jpg me3.jpg -o me.safetensors
  appleswap identity -s portrait.png -o person.safetensors --masked
"""


class _Formatter(HelpFormatter):
    """Leaves out argparse's "(default: ...)" for config-backed flags, whose help already states the default."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if type(action.default) is object:  # config.py's "unset" sentinel
            return action.help
        return super()._get_help_string(action)


@dataclasses.dataclass(frozen=True)
class EncoderOptions:
    """How the identity encoder runs (config-file section ``[identity]`` or ``[prepare_ids]``, or flags)."""

    parser: str | None = option(None, "BiSeNet face-parsing checkpoint (parsing_bisenet.pth or FaceParser.pth); "
                                "default: the registry's facexlib_parsing, else the MediaPipe mesh")
    dtype: Dtype = option("fp32", "EVA-CLIP / IDFormer precision")
    det_size: int = option(640, "SCRFD input size in pixels (square), as PuLID's det_size")
    parity: bool = option(False, "the encoder as the authors run it (docs/fidelity.md): bf16")


@dataclasses.dataclass(frozen=True)
class PrepareIdsConfig(EncoderOptions):
    kinds: tuple[str, ...] = option(("masked", "raw"), "token sets to write: masked and/or raw")
    import_npy: bool = option(True, "import the dataset's pulid_id/ and masked_pulid_id/ .npy files instead of "
                              "recomputing them")


def _config(cls: type, args: argparse.Namespace, section: str):
    from appleswap.parity import apply_parity

    file_data = load_config_file(args.config)
    if isinstance(file_data.get(section), dict):
        file_data = file_data[section]
    return apply_parity(resolve_config(cls, args, file_data), section.replace("_", "-"))


def add_parser(subparsers) -> None:
    prep = subparsers.add_parser(
        "prepare-ids", parents=[common_parser()], formatter_class=_Formatter, epilog=PREPARE_EXAMPLES,
        help="PuLID ID tokens (masked, raw, null) for every image of a preprocessed dataset",
        description="Write <cache>/masked/<id>/<name>.safetensors, <cache>/raw/... and <cache>/null.safetensors "
        "for the dataset's images (identity tree <id>/<name>.jpg or flat).",
    )
    prep.add_argument("dataset", help="preprocessed dataset folder (read only)")
    late_required(prep, "-o", "--output", dest="cache", metavar="DIR", help="the ID cache folder to write, outside the dataset")
    add_alias(prep, "--cache", "--output", dest="cache")
    prep.add_argument("--shard-index", type=int, default=None, help="this process's shard (default: $RANK or 0)")
    prep.add_argument("--num-shards", type=int, default=None, help="number of shards (default: $WORLD_SIZE or 1)")
    add_config_args(prep.add_argument_group("prepare-ids"), PrepareIdsConfig)
    prep.set_defaults(func=run_prepare)

    ident = subparsers.add_parser(
        "identity", parents=[common_parser()], formatter_class=_Formatter, epilog=IDENTITY_EXAMPLES,
        help="make one reusable identity file (averaged ID tokens) from source photos",
        description="Average one person's photos into a (1, 32, 2048) PuLID identity saved as safetensors.",
    )
    late_required(ident, "-s", "--source", nargs="+", help="photos of one person")
    late_required(ident, "-o", "--output", help="identity file to write (.safetensors)")
    ident.add_argument("--masked", action="store_true", help="black out everything but the face first (as the "
                       "reference's training IDs); default: raw photos, as the reference's inference")
    add_config_args(ident.add_argument_group("encoder"), EncoderOptions)
    ident.set_defaults(func=run_identity)


def _factory(args: argparse.Namespace, options: EncoderOptions):
    from appleswap.identity.encoder import IdentityEncoder

    dtype = torch_dtype(options.dtype)
    return lambda: IdentityEncoder.from_pretrained(args.weights_dir, device=args.device, dtype=dtype,
                                                   parser_path=options.parser, det_size=options.det_size)


def run_prepare(args: argparse.Namespace) -> int:
    from appleswap.cli_common import exit_status
    from appleswap.identity.prepare import run_prepare_ids

    config = _config(PrepareIdsConfig, args, "prepare_ids")
    stats = run_prepare_ids(args.dataset, args.cache, _factory(args, config), kinds=tuple(config.kinds),
                            shard_index=args.shard_index, num_shards=args.num_shards,
                            import_npy=config.import_npy, progress=progress_enabled(args))
    print(f"prepare-ids: {stats.written} computed, {stats.imported} imported from .npy, {stats.skipped} already "
          f"done, {len(stats.failed)} failed; null ID: {stats.null}")
    for line in stats.failed[:20]:
        print(f"  failed: {line}")
    return exit_status(stats.written + stats.imported + stats.skipped, len(stats.failed))


def run_identity(args: argparse.Namespace) -> int:
    from pathlib import Path

    from appleswap.files import load_image
    from appleswap.identity.store import save_identity

    images = [load_image(path) for path in args.source]
    encoder = _factory(args, _config(EncoderOptions, args, "identity"))()
    feats = encoder.features(images, masked=args.masked, names=list(args.source))
    tokens = encoder.tokens_from_features(feats.mean(encoder.arcface_dim))
    meta = encoder.metadata(masked=args.masked, mask_source=",".join(sorted(set(feats.mask_sources))))
    meta.update({"sources": [Path(p).name for p in args.source], "num_sources": len(images),
                 "averaging": "encoder inputs (ArcFace, CLIP CLS, hidden states), one IDFormer pass"})
    save_identity(args.output, tokens, meta)
    print(f"identity: {args.output} from {len(images)} photo(s), tokens {tuple(tokens.shape)}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Run just these two commands (``python -m appleswap.identity.cli prepare-ids ...``, handy under torchrun)."""
    import sys

    from appleswap.cli_common import parse_command_line, setup_logging

    parser = argparse.ArgumentParser(prog="appleswap-identity", formatter_class=HelpFormatter)
    add_parser(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    args = parse_command_line(parser, argv)
    setup_logging(args.log_level)
    try:
        return int(args.func(args) or 0)
    except (FileNotFoundError, ValueError) as error:
        print(f"appleswap {args.command}: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
