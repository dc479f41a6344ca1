"""How much could exact candidate pruning save in PCA locality? A measurement, not a timing.

A weight whose logit is more than 40 below its row's maximum is below e^-40 of it and changes no float32 result, so
an exact pruner may skip image i for sample b and output pixel p when d_p(i) > min_j d_p(j) + 80 (1 - a) tau. This
script computes every d_p(i) in float64 for a sample of output pixels (all channels of a few pixel positions) on
held-out trajectories x_t = sqrt(a) y + sqrt(1 - a) eps and reports, per timestep:

- "ideal (b, p)": the share of images within 40 logits of the maximum, per sample and output pixel: what the best
  possible pruner, one that knew every exact distance, would still compute;
- "ideal tile": the same, united over the batch and a pixel position's channels: what a pruner that keeps one GEMM
  per tile (shared columns) would compute;
- "bound tile": the share kept by a real, cheap lower bound, the exact distance over the inputs that all of the
  tile's columns share (the intersection of their supports, a lower bound on each d_p), against the tile's largest
  min_j d_p(j) + 80 (1 - a) tau.

    python benchmarks/bench_pca_locality_pruning.py                  # N = 2000, 32x32x3 patches, B = 8
    python benchmarks/bench_pca_locality_pruning.py --num-images 500 --positions 4
"""

from __future__ import annotations

import argparse
import math
import random

import torch

from diffusers_analytic.data import load_builtin, to_model_space
from diffusers_analytic.models.denoiser_pca_locality import PCALocalityDenoiser
from diffusers_analytic.models.pca_mask import pca_locality_mask


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, default=2000)
    parser.add_argument("--size", type=int, default=32)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threshold", type=float, default=0.02)
    parser.add_argument("--timesteps", type=int, nargs="+", default=[700, 500, 300, 100, 20])
    parser.add_argument("--positions", type=int, default=16, help="pixel positions sampled per timestep")
    return parser.parse_args()


def main():
    args = parse_args()
    torch.manual_seed(0)
    random.seed(0)
    denoiser = PCALocalityDenoiser.from_dataset(
        load_builtin("patches", size=args.size, num_images=args.num_images), show_progress=False
    )
    images = to_model_space(denoiser.images.reshape(args.num_images, -1)).double()  # y  [N, D]
    held_out = load_builtin("patches", size=args.size, num_images=args.batch_size, seed=7)
    clean = to_model_space(held_out.images.reshape(args.batch_size, -1)).double()  # [B, D]
    channels, height, width = denoiser.sample_shape
    pixel_index = torch.arange(channels * height * width).reshape(channels, height, width)
    positions = random.sample([(i, j) for i in range(height) for j in range(width)], args.positions)
    print(f"N = {args.num_images}, D = {images.shape[1]}, B = {args.batch_size}, threshold = {args.threshold}")
    print(f"{'t':>5} {'mask nnz %':>10} {'ideal (b, p) %':>14} {'ideal tile %':>12} {'bound tile %':>12}")
    for timestep in args.timesteps:
        a = float(denoiser.alphas_cumprod[timestep])
        mask = pca_locality_mask(denoiser.eigvecs, denoiser.eigvals, a, args.threshold)  # [D, D]
        x = math.sqrt(a) * clean + math.sqrt(1 - a) * torch.randn(clean.shape, dtype=torch.float64)
        margin = 80.0 * (1 - a)  # 40 logits, in distance units (tau = 1)
        ideal, tile, bound = [], [], []
        for i, j in positions:
            columns = mask[:, pixel_index[:, i, j]].double()  # [D, P]
            # d[b, p, i] = sum_q M[q, p] (x[b, q] - sqrt(a) y_i[q])^2
            distances = (
                (x**2 @ columns)[:, :, None]
                - 2 * math.sqrt(a) * torch.einsum("bq,qp,nq->bpn", x, columns, images)
                + a * (columns.T @ (images**2).T)[None]
            )  # [B, P, N]
            keep = distances <= distances.amin(-1, keepdim=True) + margin
            ideal.append(keep.double().mean().item())
            tile.append(keep.any(1).any(0).double().mean().item())
            shared = torch.nonzero(columns.bool().all(1), as_tuple=True)[0]
            lower = ((x[:, None, shared] - math.sqrt(a) * images[None, :, shared]) ** 2).sum(-1)  # [B, N]
            limit = (distances.amin(-1) + margin).amax(1)  # [B]
            bound.append((lower <= limit[:, None]).any(0).double().mean().item())
        mean = lambda values: 100 * sum(values) / len(values)  # noqa: E731
        print(
            f"{timestep:>5} {100 * mask.double().mean().item():>10.1f} {mean(ideal):>14.1f} {mean(tile):>12.1f}"
            f" {mean(bound):>12.1f}"
        )


if __name__ == "__main__":
    main()
