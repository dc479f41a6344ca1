"""A/B timings in one process, the two variants alternating, so that a shared machine's drift hits both alike.

    python benchmarks/bench_ab.py split          # optimal / nearest: images split over the threads vs one stream
    python benchmarks/bench_ab.py pca-dense      # PCA locality: one-GEMM dense path vs the tiled dense path

`split` times `denoise` at N = 10000 (32x32x3 patches), batch 8, 16, 32 and 64, with the images streamed in one
range per torch thread (`functional.MIN_IMAGES_PER_THREAD` = 1024) and in one stream (the minimum raised above N).
`pca-dense` times a PCA-locality step (N = 2000, B = 8, threshold 0.02, mask cached) with the dense formulation as
one GEMM for all pixels and, forced, as the 512-pixel tiles that the sparse tilings use, and reports both results'
relative difference. Prints the best of `--repeats` calls per variant and round.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

import diffusers_analytic as da
from diffusers_analytic.models import denoiser_pca_locality, functional


def best_of(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def ab_split(args) -> None:
    patches = da.load_builtin("patches", size=32, num_images=args.num_images)
    minimum = functional.MIN_IMAGES_PER_THREAD
    print(f"N = {args.num_images}, {torch.get_num_threads()} threads; ms per call, split / one stream, per round")
    for method in ("optimal", "nearest_dataset"):
        for storage in ("uint8", "float32") if method == "optimal" else ("uint8",):
            denoiser = da.get_denoiser_class(method).from_dataset(patches, storage_dtype=storage, show_progress=False)
            for batch_size in args.batch_sizes:
                x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
                for timestep in (999, 100):
                    rounds = []
                    for _ in range(args.rounds):
                        row = []
                        for split in (True, False):
                            functional.MIN_IMAGES_PER_THREAD = minimum if split else args.num_images + 1
                            row.append(1e3 * best_of(partial(denoiser.denoise, x, timestep), args.repeats))
                        rounds.append(f"{row[0]:.1f} / {row[1]:.1f}")
                    print(f"{method:>15} {storage:>7} B = {batch_size:>2} t = {timestep:>3}: " + ", ".join(rounds))
    functional.MIN_IMAGES_PER_THREAD = minimum


def ab_pca_dense(args) -> None:
    patches = da.load_builtin("patches", size=32, num_images=args.num_images)
    denoiser = da.PCALocalityDenoiser.from_dataset(patches, show_progress=False, mask_threshold=0.02)
    x = torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    dense = denoiser_pca_locality.LocalityMask.dense
    print(f"N = {args.num_images}, B = 8; s per step (mask cached), one GEMM / tiled, per round")
    try:
        for timestep in (500, 100):
            denoiser.locality_mask(float(denoiser.alphas_cumprod[timestep]), 8)
            rounds, outputs = [], {}
            for _ in range(args.rounds):
                row = []
                for variant in ("one GEMM", "tiled"):
                    denoiser_pca_locality.LocalityMask.dense = (
                        dense if variant == "one GEMM" else property(lambda self: False)
                    )
                    row.append(best_of(partial(denoiser.denoise, x, timestep), 1))
                    outputs[variant] = denoiser.denoise(x, timestep)
                rounds.append(f"{row[0]:.2f} / {row[1]:.2f}")
            difference = float((outputs["one GEMM"] - outputs["tiled"]).norm() / outputs["tiled"].norm())
            print(f"t = {timestep}: " + ", ".join(rounds) + f"; relative difference {difference:.1e}")
    finally:
        denoiser_pca_locality.LocalityMask.dense = dense


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["split", "pca-dense"])
    parser.add_argument("--num-images", type=int, default=None, help="default: 10000 (split), 2000 (pca-dense)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 32, 64])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()
    if args.what == "split":
        args.num_images = args.num_images or 10000
        ab_split(args)
    else:
        args.num_images = args.num_images or 2000
        ab_pca_dense(args)


if __name__ == "__main__":
    main()
