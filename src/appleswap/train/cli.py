"""``appleswap train teacher|student`` and ``appleswap train convert-arcface``.

Launch on one GPU as is; on several GPUs or nodes through accelerate (docs/training.md)::

    accelerate launch --config_file configs/accelerate/multi_gpu.yaml -m appleswap.cli \
        train teacher --config configs/teacher.yaml
"""

from __future__ import annotations

import argparse

from appleswap.cli_common import HelpFormatter, common_parser
from appleswap.config import add_config_args, config_to_dict, load_config_file, resolve_config
from appleswap.train.config import StudentConfig, TrainConfig


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("train", help="train the teacher or the student LoRA", description=__doc__,
                                   formatter_class=HelpFormatter)
    stages = parser.add_subparsers(dest="stage", metavar="STAGE", required=True)
    for name, cls, text in (("teacher", TrainConfig, "conditional deblurring on preprocessed photos (docs/method.md)"),
                            ("student", StudentConfig, "direct editing on pseudo-triplets (docs/method.md: Student)")):
        sub = stages.add_parser(name, help=text, parents=[common_parser()], formatter_class=HelpFormatter)
        add_config_args(sub, cls)
        sub.add_argument("--no-resume", action="store_true", help="start fresh even if checkpoints exist")
        sub.set_defaults(func=run, config_class=cls)
    conv = stages.add_parser("convert-arcface", help="SimSwap arcface_checkpoint.tar -> safetensors (no pickled "
                             "code runs)", parents=[common_parser()], formatter_class=HelpFormatter)
    conv.add_argument("source", help="arcface_checkpoint.tar")
    conv.add_argument("output", help="destination .safetensors "
                      "(registry: <weights>/arcface/arcface_simswap.safetensors)")
    conv.set_defaults(func=run_convert)


def run_convert(args: argparse.Namespace) -> int:
    from appleswap.train.arcface import convert_simswap_arcface

    print(convert_simswap_arcface(args.source, args.output))
    return 0


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    import torch

    from appleswap.files import save_json
    from appleswap.train import build
    from appleswap.train.trainer import make_accelerator, train

    data = load_config_file(args.config)
    data = data[args.stage] if isinstance(data.get(args.stage), dict) else data  # sectioned or flat file
    config = resolve_config(args.config_class, args, data)
    build.preflight(config, args.weights_dir)  # before any model or dataset is loaded
    cpu = args.device == "cpu" or (args.device is None and not torch.cuda.is_available())
    accelerator = make_accelerator(config, cpu=cpu)
    torch.manual_seed(config.seed)
    if args.stage == "teacher":
        train_set, val_set = build.build_teacher_data(config)
    else:
        train_set, val_set = build.build_student_data(config)
    parts = build.build_parts(config, args.weights_dir, accelerator.device)
    if accelerator.is_main_process:
        save_json(Path(config.output_dir) / "config.json", config_to_dict(config))
    result = train(parts, train_set, val_set, config, accelerator, resume=not args.no_resume)
    if accelerator.is_main_process:
        print(f"trained to step {result['step']}; checkpoints in {Path(config.output_dir) / 'checkpoints'}")
    return 0
