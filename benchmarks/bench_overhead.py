"""Per-call cost on tiny data: ours against the research reference's methods on the built-in digits (D = 64).

    python benchmarks/bench_overhead.py [--threads 1] [--rounds 20] [--batch-sizes 8 64]

On 8x8 images a call's arithmetic is microseconds; what it costs is fixed work: input checks, the schedule, dtype
handling, the number of small tensor operations. Each reference method is written here from its description
(Analytic Diffusion Studio), driven with the same fitted data and inputs (noisy digits at t = 500):

- Wiener: rebuild the D x D filter W = U diag(sqrt(a) lam / (a lam + 1 - a)) U^T, then x0 = mu + (x - sqrt(a) mu) W;
- optimal: FAISS flat L2 search of x_t / sqrt(a) for its default k = 2000 neighbours (all 1797 digits), gather them,
  softmax of -a d / (2 (1 - a)), weighted sum by `bmm`;
- nearest: FAISS flat L2 search for k = 1, gather the image.

Ours is the public `denoise` with every input check. The methods alternate within each round; the table gives the best
mean call time over `--rounds` rounds of 50 calls and the ratio ours / reference (target: <= 1). FAISS rows need
`faiss-cpu`.
"""

from __future__ import annotations

import argparse

import torch
from timing import alternating_best

import diffusers_analytic as da


def reference_wiener(x, a, mean, eigvecs, eigvals):
    filt = (eigvecs * (a**0.5 * eigvals / (a * eigvals + 1 - a))) @ eigvecs.T
    return mean + (x.reshape(len(x), -1) - a**0.5 * mean) @ filt


def reference_search(index, data, x, a, k):
    """FAISS search of x / sqrt(a): squared distances rescaled by a, and the found images `[B, k, D]`."""
    import numpy as np

    query = (x / a**0.5).reshape(len(x), -1).numpy().astype(np.float32)
    distances, indices = index.search(query, k)
    return torch.from_numpy(distances) * a, data[torch.from_numpy(indices)]


def reference_optimal(index, data, x, a, k=2000):
    distances, neighbours = reference_search(index, data, x, a, min(k, len(data)))
    weights = torch.softmax(-distances / (2 * (1 - a)), dim=1)
    return torch.bmm(weights.unsqueeze(1), neighbours).squeeze(1)


def reference_nearest(index, data, x, a):
    return reference_search(index, data, x, a, 1)[1][:, 0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=None, help="torch threads for this run (default: torch's)")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)  # a benchmark process: its own choice
    try:
        import faiss
    except ImportError:
        faiss = None

    digits = da.load_builtin("digits")
    data = (digits.images.float() / 127.5 - 1).reshape(len(digits.images), -1)  # model space [N, D]
    wiener = da.WienerDenoiser.from_dataset(digits.images, show_progress=False)
    optimal = da.OptimalDenoiser.from_dataset(digits.images)
    nearest = da.NearestDatasetDenoiser.from_dataset(digits.images)
    index = None
    if faiss is not None:
        faiss.omp_set_num_threads(torch.get_num_threads())
        index = faiss.IndexFlatL2(data.shape[1])
        index.add(data.numpy())

    t = 500
    a = float(wiener.alphas_cumprod[t])
    print(f"{torch.get_num_threads()} torch threads; best mean of 50 calls over {args.rounds} alternating rounds")
    print("| method | B | ours us | reference us | ours / reference | max abs difference |")
    print("|---|---|---|---|---|---|")
    for batch_size in args.batch_sizes:
        x0 = data[:batch_size].reshape(batch_size, 1, 8, 8)
        x = a**0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
        cases = [
            (
                "wiener",
                lambda x=x: wiener.denoise(x, t),
                lambda x=x: reference_wiener(x, a, wiener.mean, wiener.eigvecs, wiener.eigvals),
            )
        ]
        if index is not None:
            cases.append(
                ("optimal", lambda x=x: optimal.denoise(x, t), lambda x=x: reference_optimal(index, data, x, a))
            )
            cases.append(
                ("nearest", lambda x=x: nearest.denoise(x, t), lambda x=x: reference_nearest(index, data, x, a))
            )
        for name, ours, reference in cases:
            difference = (ours().reshape(batch_size, -1) - reference().reshape(batch_size, -1)).abs().max()
            best = alternating_best({"ours": ours, "reference": reference}, args.rounds, calls=50)
            print(
                f"| {name} | {batch_size} | {best['ours'] * 1e6:.0f} | {best['reference'] * 1e6:.0f} | "
                f"{best['ours'] / best['reference']:.2f} | {float(difference):.1e} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
