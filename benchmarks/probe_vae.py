"""The FLUX VAE at 512x512 (issue 6): encode and decode times eager (cuDNN autotuned, what the pipeline did) and
compiled (``latents.compile_vae``), the difference between them, and where the eager time goes.

    PYTHONPATH=src python benchmarks/probe_vae.py [--repeats 10] [--batch 1]
"""

from __future__ import annotations

import argparse
import copy

import torch

from appleswap.bench import BenchConfig, build_vae
from appleswap.bench_utils import time_call
from appleswap.model.latents import compile_vae, decode_tokens, encode_images
from appleswap.pipeline import vae_conv_flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--modes", default="default", help="torch.compile modes, comma-separated "
                        "(max-autotune-no-cudagraphs autotunes every convolution: over 5 minutes on an H100)")
    args = parser.parse_args()
    torch.manual_seed(0)
    vae = build_vae(BenchConfig(), "cuda", torch.bfloat16)
    image = torch.rand(args.batch, 3, 512, 512, device="cuda")
    tokens = encode_images(vae, image)
    print("| VAE | encode ms | decode ms | rel. L2 diff of the decoded image vs eager |")
    print("|---|---|---|---|")
    with vae_conv_flags():
        reference = decode_tokens(vae, tokens, 512, 512)
        models = {"eager, cuDNN autotuned": vae}
        for mode in args.modes.split(","):
            models[f"compiled ({mode})"] = compile_vae(copy.deepcopy(vae), None if mode == "default" else mode)
        for name, model in models.items():
            encode = time_call(lambda m=model: encode_images(m, image), "cuda", args.repeats, warmup=2)
            decode = time_call(lambda m=model: decode_tokens(m, tokens, 512, 512), "cuda", args.repeats, warmup=2)
            out = decode_tokens(model, encode_images(model, image), 512, 512)
            diff = ((out - reference).norm() / reference.norm()).item()
            print(f"| {name} | {encode * 1e3:.2f} | {decode * 1e3:.2f} | {diff:.2e} |")
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            decode_tokens(vae, encode_images(vae, image), 512, 512)
            torch.cuda.synchronize()
    print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
