"""The FLUX VAE (issue 6): encode and decode times eager (cuDNN autotuned, what the pipeline did) and compiled
(``latents.compile_vae``), each bf16 model's distance to the fp32 VAE (is the compiled difference more than bf16
rounding?), and where the eager time goes.

    PYTHONPATH=src python benchmarks/probe_vae.py [--repeats 10] [--batch 1] [--size 512]
    PYTHONPATH=src python benchmarks/probe_vae.py --device cpu --size 256 --repeats 1   # numerics only
"""

from __future__ import annotations

import argparse
import copy

import torch

from appleswap.bench import BenchConfig, build_vae
from appleswap.bench_utils import relative_l2, time_call
from appleswap.model.latents import compile_vae, decode_tokens, encode_images, vae_conv_flags


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--modes", default="default", help="torch.compile modes, comma-separated "
                        "(max-autotune-no-cudagraphs autotunes every convolution: over 5 minutes on an H100)")
    args = parser.parse_args()
    torch.manual_seed(0)
    reference_vae = build_vae(BenchConfig(), args.device, torch.float32)
    vae = copy.deepcopy(reference_vae).to(torch.bfloat16)
    image, size = torch.rand(args.batch, 3, args.size, args.size, device=args.device), args.size
    with torch.no_grad():
        fp32_tokens = encode_images(reference_vae, image)
        fp32_image = decode_tokens(reference_vae, fp32_tokens, size, size)
    print(f"| VAE, {size}x{size} | encode ms | decode ms | rel. L2 to fp32: tokens | round trip | "
          "decode of the fp32 tokens |")
    print("|---|---|---|---|---|---|")
    with vae_conv_flags():
        models = {"eager bf16, cuDNN autotuned": vae}
        for mode in args.modes.split(","):
            models[f"compiled bf16 ({mode})"] = compile_vae(copy.deepcopy(vae), None if mode == "default" else mode)
        for name, model in models.items():
            tokens = encode_images(model, image)
            encode = time_call(lambda m=model: encode_images(m, image), args.device, args.repeats, warmup=2)
            decode = time_call(lambda m=model, t=tokens: decode_tokens(m, t, size, size), args.device, args.repeats,
                               warmup=2)
            round_trip = relative_l2(decode_tokens(model, tokens, size, size), fp32_image)
            decoded = relative_l2(decode_tokens(model, fp32_tokens.to(tokens.dtype), size, size), fp32_image)
            print(f"| {name} | {encode * 1e3:.2f} | {decode * 1e3:.2f} | {relative_l2(tokens, fp32_tokens):.2e} | "
                  f"{round_trip:.2e} | {decoded:.2e} |")
        if args.device.startswith("cuda"):
            with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                decode_tokens(vae, encode_images(vae, image), size, size)
                torch.cuda.synchronize()
            print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=12, max_name_column_width=70))


if __name__ == "__main__":
    main()
