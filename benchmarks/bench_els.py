"""ELS (and LS) machine: per-step `denoise` time beside the cost of its convolution at the measured matmul rate.

    python benchmarks/bench_els.py                      # digits (N = 1797, 8x8x1), k = 3, 5, 7; 32x32x3, N = 1000, k = 3
    python benchmarks/bench_els.py --k7 --k15           # also 32x32x3 with k = 7 and k = 15 (slow on a CPU)
    python benchmarks/bench_els.py --device cuda --k7 --k15

The ELS cross term is one convolution of the padded query with all M training patches as filters:
B * H * W * M * C * k^2 multiply-adds, M = N (H - k + 1)^2 valid patches (zero padding). "ideal s" is the time that
convolution takes at the float32 matmul rate measured here (2 flops per multiply-add); the rest of a step is the
softmax (B * H * W * M exponentials) and the weighted sum of patch centres. Prints a table and writes
benchmarks/results/els.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch
from timing import best_time, synchronize

import diffusers_analytic as da


def matmul_gflops(device: str, size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size, device=device), torch.randn(size, size, device=device)
    a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--k7", action="store_true", help="add 32x32x3, N = 1000, k = 7")
    parser.add_argument("--k15", action="store_true", help="add 32x32x3, N = 1000, k = 15")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--chunk-size", type=int, default=None, help="ELS patches per chunk (default: the config's)")
    args = parser.parse_args()

    rate = matmul_gflops(args.device)
    digits = da.load_builtin("digits").images
    crops = da.load_builtin("patches", size=32, num_images=1000).images
    cases = [("digits", digits, k, False) for k in (3, 5, 7)] + [("digits", digits, 5, True)]
    cases += [("patches32", crops, 3, False)]
    cases += [("patches32", crops, 7, False)] if args.k7 else []
    cases += [("patches32", crops, 15, False)] if args.k15 else []
    extra = {} if args.chunk_size is None else {"chunk_size": args.chunk_size}

    rows = []
    for name, images, k, boundary_aware in cases:
        els = da.EquivariantLocalScoreDenoiser.from_dataset(
            images, patch_size_schedule=k, boundary_aware=boundary_aware, **extra
        ).to(args.device)
        ls = da.LocalScoreDenoiser.from_dataset(images, patch_size_schedule=k).to(args.device)
        channels, height, width = els.sample_shape
        x = torch.randn(args.batch_size, channels, height, width, device=args.device)
        els_s = best_time(lambda d=els, x=x: d.denoise(x, 500), args.repeats, args.device)
        ls_s = best_time(lambda d=ls, x=x: d.denoise(x, 500), args.repeats, args.device)
        patches = els.num_training_patches(k)
        macs = args.batch_size * height * width * patches * channels * k * k
        rows.append(
            {
                "data": name,
                "N": len(images),
                "shape": [channels, height, width],
                "k": k,
                "boundary_aware": boundary_aware,
                "batch": args.batch_size,
                "patches_M": patches,
                "conv_gmac": macs / 1e9,
                "ideal_s": 2 * macs / (rate * 1e9),
                "els_s": els_s,
                "els_s_per_sample": els_s / args.batch_size,
                "ls_s": ls_s,
            }
        )

    print(
        f"float32 matmul rate: {rate:.0f} GFLOP/s ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {args.device}); batch {args.batch_size}"
    )
    print(
        f"{'data':>10} {'N':>5} {'k':>3} {'BA':>3} {'M':>8} {'GMAC':>8} {'ideal s':>8} {'ELS s':>8} {'of ideal':>8} {'LS s':>8}"
    )
    for r in rows:
        print(
            f"{r['data']:>10} {r['N']:>5} {r['k']:>3} {'y' if r['boundary_aware'] else 'n':>3} {r['patches_M']:>8} "
            f"{r['conv_gmac']:>8.2f} {r['ideal_s']:>8.4f} {r['els_s']:>8.4f} {r['ideal_s'] / r['els_s']:>8.0%} "
            f"{r['ls_s']:>8.4f}"
        )
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "els.json"), "w") as f:
        json.dump({"matmul_gflops": rate, "device": args.device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
