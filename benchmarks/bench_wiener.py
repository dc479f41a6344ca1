"""Wiener denoiser: fit time and per-call `denoise` time, beside this machine's measured float32 matmul rate.

    python benchmarks/bench_wiener.py                 # D = 3072 (32x32x3 patches, N = 10000) and D = 12288 (64x64x3, N = 2000)
    python benchmarks/bench_wiener.py --quick         # D = 3072 only

Prints a table and writes benchmarks/results/wiener.json. The reference implementation builds a D x D filter per
call: about 0.40 s per call at D = 3072, B = 8, and 3.4-4.5 s to fit, on a 2-core machine of this kind.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import torch

import diffusers_analytic as da

REFERENCE_CALL_S = {(3072, 8): 0.40}
REFERENCE_FIT_S = {3072: (3.4, 4.5)}


def matmul_gflops(size: int = 2048, repeats: int = 5) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def time_call(fn, repeats: int) -> float:
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="only D = 3072")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()

    rate = matmul_gflops()
    cases = [(32, 10000)] if args.quick else [(32, 10000), (64, 2000)]
    rows = []
    for size, count in cases:
        images = da.load_builtin("patches", size=size, num_images=count).images
        start = time.perf_counter()
        denoiser = da.WienerDenoiser.from_dataset(images, show_progress=False)
        fit_s = time.perf_counter() - start
        denoiser.to(args.device)
        dim = denoiser.eigvecs.shape[0]
        rank = denoiser.eigvecs.shape[1]
        for batch in (8, 64):
            x = torch.randn(batch, 3, size, size, device=args.device)
            call_s = time_call(lambda d=denoiser, x=x: d.denoise(x, 500), args.repeats)
            flops = 4 * batch * dim * rank
            reference = REFERENCE_CALL_S.get((dim, batch))
            rows.append(
                {
                    "D": dim,
                    "N": count,
                    "batch": batch,
                    "fit_s": fit_s,
                    "call_ms": call_s * 1e3,
                    "gflops": flops / call_s / 1e9,
                    "fraction_of_matmul_rate": flops / call_s / 1e9 / rate if args.device == "cpu" else None,
                    "speedup_vs_reference": reference / call_s if reference else None,
                }
            )
    header = f"{'D':>6} {'N':>6} {'B':>4} {'fit s':>7} {'call ms':>8} {'GFLOP/s':>8} {'of peak':>8} {'vs ref':>8}"
    print(
        f"float32 matmul rate on this machine: {rate:.0f} GFLOP/s ({platform.processor() or platform.machine()}, "
        f"{torch.get_num_threads()} threads, device {args.device})"
    )
    print(header)
    for r in rows:
        frac = f"{r['fraction_of_matmul_rate']:.0%}" if r["fraction_of_matmul_rate"] is not None else "-"
        speed = f"{r['speedup_vs_reference']:.0f}x" if r["speedup_vs_reference"] else "-"
        print(
            f"{r['D']:>6} {r['N']:>6} {r['batch']:>4} {r['fit_s']:>7.2f} {r['call_ms']:>8.2f} {r['gflops']:>8.1f} {frac:>8} {speed:>8}"
        )
    os.makedirs(os.path.join(os.path.dirname(__file__), "results"), exist_ok=True)
    with open(os.path.join(os.path.dirname(__file__), "results", "wiener.json"), "w") as f:
        json.dump({"matmul_gflops": rate, "device": args.device, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
