"""Wiener denoiser against the research reference's method, timed alternately in one process.

    python benchmarks/bench_wiener.py          # digits (D = 64), patches 32x32x3 (N = 10000) and 64x64x3 (N = 2000)
    python benchmarks/bench_wiener.py --quick    # digits and D = 3072
    python benchmarks/bench_wiener.py --eigh     # the fit's eigendecomposition at D = 3072: torch's against ours
    python benchmarks/bench_wiener.py --fit      # the fit, ours against the reference's method (D = 3072 and 12288)

The reference method rebuilds the D x D filter on every call (`reference_wiener` below, written from the formula):
W = U diag(sqrt(a) lam / (a lam + 1 - a)) U^T, x0 = mu + (x - sqrt(a) mu) W. Both get the same fitted mean,
eigenvectors and eigenvalues and the same inputs (noisy training images at t = 500); ours is the public
`denoise` call with every input check. Rounds alternate the two, so a shared machine's drift hits both alike; the
table gives the best call of each and their ratio (ours / reference), and the fit time of each data set.

The reference's fit (`reference_fit`, from its description): two passes over the data in float32 (the mean, then the
sum of centred outer products), S = sum / (N - 1), and a float32 `torch.linalg.svd(S)`. Ours: `from_dataset`
(float64 moments; float64 `eigh` of S, or of the N x N Gram matrix when N < D). `--fit` alternates the two and
checks the fitted posterior means agree.
"""

from __future__ import annotations

import argparse
import time

import torch

import diffusers_analytic as da


def reference_wiener(x: torch.Tensor, a: float, mean: torch.Tensor, eigvecs: torch.Tensor, eigvals: torch.Tensor):
    filt = (eigvecs * (a**0.5 * eigvals / (a * eigvals + 1 - a))) @ eigvecs.T
    return mean + (x.reshape(len(x), -1) - a**0.5 * mean) @ filt


def reference_fit(images: torch.Tensor, batch_size: int = 256):
    flat = images.reshape(len(images), -1)
    batches = [b.float() / 127.5 - 1 for b in flat.split(batch_size)]
    mean = sum(b.sum(0) for b in batches) / len(flat)
    cov = torch.zeros(flat.shape[1], flat.shape[1])
    for b in batches:
        centred = b - mean
        cov += centred.T @ centred
    eigvecs, eigvals, _ = torch.linalg.svd(cov / (len(flat) - 1))
    return mean, eigvecs, eigvals


def fit_ab(rounds: int, with_reference_64: bool) -> None:
    """Our fit against the reference's, alternating; their posterior means compared at t = 0, 100, 500, 999."""
    cases = [(32, 10000, True), (64, 2000, with_reference_64)]
    print("| data | N | D | ours s | reference s | ours / reference | x0 difference at t = 0 / 100 / 500 / 999 |")
    print("|---|---|---|---|---|---|---|")
    for size, count, time_reference in cases:
        images = da.load_builtin("patches", size=size, num_images=count).images
        best = {"ours": float("inf"), "reference": float("inf")}
        for _ in range(rounds):
            start = time.perf_counter()
            denoiser = da.WienerDenoiser.from_dataset(images, show_progress=False)
            best["ours"] = min(best["ours"], time.perf_counter() - start)
            if time_reference:
                start = time.perf_counter()
                mean, eigvecs, eigvals = reference_fit(images)
                best["reference"] = min(best["reference"], time.perf_counter() - start)
        difference = "-"
        if time_reference:
            x = images[:8].float() / 127.5 - 1
            x = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
            differences = []
            for t in (0, 100, 500, 999):
                a = float(denoiser.alphas_cumprod[t])
                ours = denoiser.denoise(x, t).reshape(8, -1).double()
                theirs = reference_wiener(x, a, mean, eigvecs, eigvals).double()
                differences.append(float(torch.linalg.norm(ours - theirs) / torch.linalg.norm(theirs)))
            difference = " / ".join(f"{d:.1e}" for d in differences)
        print(
            f"| patches{size} | {count} | {images[0].numel()} | {best['ours']:.2f} | {best['reference']:.2f} | "
            f"{best['ours'] / best['reference']:.3f} | {difference} |",
            flush=True,
        )


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
    parser.add_argument("--fit", action="store_true", help="only the fit A/B (2 rounds)")
    parser.add_argument(
        "--reference-64", action="store_true", help="with --fit: time the reference's fit at D = 12288 too (long)"
    )
    args = parser.parse_args()
    if args.eigh:
        eigh_ab(rounds=2)
        return
    if args.fit:
        fit_ab(rounds=2, with_reference_64=args.reference_64)
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
