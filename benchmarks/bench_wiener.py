"""Wiener denoiser against the research reference's method, timed alternately in one process.

    python benchmarks/bench_wiener.py          # digits (D = 64), patches 32x32x3 (N = 10000) and 64x64x3 (N = 2000)
    python benchmarks/bench_wiener.py --quick    # digits and D = 3072
    python benchmarks/bench_wiener.py --eigh     # the fit's eigendecomposition at D = 3072: torch's against ours

The reference method rebuilds the D x D filter on every call (`reference_wiener` below, written from the formula):
W = U diag(sqrt(a) lam / (a lam + 1 - a)) U^T, x0 = mu + (x - sqrt(a) mu) W. Both get the same fitted mean,
eigenvectors and eigenvalues and the same inputs (noisy training images at t = 500); ours is the public
`denoise` call with every input check. Rounds alternate the two, so a shared machine's drift hits both alike; the
table gives the best call of each and their ratio (ours / reference), and the fit time of each data set.
"""

from __future__ import annotations

import argparse
import time

import torch

import diffusers_analytic as da


def reference_wiener(x: torch.Tensor, a: float, mean: torch.Tensor, eigvecs: torch.Tensor, eigvals: torch.Tensor):
    filt = (eigvecs * (a**0.5 * eigvals / (a * eigvals + 1 - a))) @ eigvecs.T
    return mean + (x.reshape(len(x), -1) - a**0.5 * mean) @ filt


def alternate(functions: dict, rounds: int, calls: int) -> dict:
    """Best time of one call of each function over `rounds` rounds of `calls` calls, the functions alternating."""
    best = dict.fromkeys(functions, float("inf"))
    for fn in functions.values():
        fn()
    for _ in range(rounds):
        for name, fn in functions.items():
            for _ in range(calls):
                start = time.perf_counter()
                fn()
                best[name] = min(best[name], time.perf_counter() - start)
    return best


def eigh_ab(rounds: int) -> None:
    """`torch.linalg.eigh` against `symmetric_eigh` on one D = 3072 covariance (N = 10000 patches), alternating."""
    from diffusers_analytic.kernels.moments import fit_moments, symmetric_eigh

    images = da.load_builtin("patches", size=32, num_images=10000).images
    start = time.perf_counter()
    moments, _ = fit_moments(images, show_progress=False)
    print(f"float64 moments: {time.perf_counter() - start:.2f} s")
    cov = moments.covariance()
    for _ in range(rounds):
        for name, fn in (("torch.linalg.eigh", torch.linalg.eigh), ("symmetric_eigh", symmetric_eigh)):
            start = time.perf_counter()
            fn(cov)
            print(f"{name}: {time.perf_counter() - start:.2f} s", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="digits and D = 3072 only")
    parser.add_argument("--repeats", type=int, default=20, help="alternating rounds")
    parser.add_argument("--eigh", action="store_true", help="only the eigendecomposition A/B (2 rounds)")
    args = parser.parse_args()
    if args.eigh:
        eigh_ab(rounds=2)
        return

    cases = [("digits", da.load_builtin("digits").images)]
    cases.append(("patches", da.load_builtin("patches", size=32, num_images=10000).images))
    if not args.quick:
        cases.append(("patches", da.load_builtin("patches", size=64, num_images=2000).images))
    print(f"{torch.get_num_threads()} threads; best call over {args.repeats} alternating rounds")
    print("| data | D | B | fit s | ours ms | reference ms | ours / reference |\n|---|---|---|---|---|---|---|")
    for name, images in cases:
        start = time.perf_counter()
        denoiser = da.WienerDenoiser.from_dataset(images, show_progress=False)
        fit_s = time.perf_counter() - start
        dim = denoiser.eigvecs.shape[0]
        a = float(denoiser.alphas_cumprod[500])
        mean, eigvecs, eigvals = denoiser.mean, denoiser.eigvecs, denoiser.eigvals
        calls = 50 if dim <= 256 else 1
        for batch_size in (8, 64):
            x0 = images[:batch_size].float() / 127.5 - 1
            x = a**0.5 * x0 + (1 - a) ** 0.5 * torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
            ours = denoiser.denoise(x, 500).reshape(batch_size, -1).double()
            theirs = reference_wiener(x, a, mean, eigvecs, eigvals).double()
            assert torch.linalg.norm(ours - theirs) <= 1e-5 * torch.linalg.norm(theirs)
            best = alternate(
                {
                    "ours": lambda x=x, d=denoiser: d.denoise(x, 500),
                    "reference": lambda x=x, a=a, m=mean, u=eigvecs, lam=eigvals: reference_wiener(x, a, m, u, lam),
                },
                rounds=args.repeats if dim <= 256 else max(3, args.repeats // 4),
                calls=calls,
            )
            print(
                f"| {name} | {dim} | {batch_size} | {fit_s:.2f} | {best['ours'] * 1e3:.3f} | "
                f"{best['reference'] * 1e3:.3f} | {best['ours'] / best['reference']:.2f} |"
            )


if __name__ == "__main__":
    main()
