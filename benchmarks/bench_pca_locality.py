"""Benchmark of the PCA-locality denoiser over the timesteps of a 10-step DDIM run (t = 900 ... 0).

Per step: the evaluation the cost model picked (`ones`, `dense`, `sparse`, `complement`, `tiles`), the mask's time
(float64, once per noise level) and the denoising time, the flops of the path taken, and their achieved rate as a
fraction of the float32 GEMM rate measured in the same run, just before the step, on the dense path's own GEMM shape
`[2048, D] x [D, D]`. Dense steps are checked against the target of 60% of that rate; sparse steps are also compared
with the dense formulation's time at that rate (their speed-up over running dense). Prints a table and writes JSON
to benchmarks/results/.

    python benchmarks/bench_pca_locality.py                          # D = 3072, N = 2000 and 10000, B = 8
    python benchmarks/bench_pca_locality.py --num-images 500 --size 16 --steps 5    # quick run
    python benchmarks/bench_pca_locality.py --num-images 2000 --product-rates   # + the cost model's rate ratio
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time

import torch
from diffusers import DDIMScheduler
from timing import synchronize

from diffusers_analytic.data import load_builtin
from diffusers_analytic.models.denoiser_pca_locality import DENSE_PIECE_ROWS, PCALocalityDenoiser
from diffusers_analytic.models.pca_mask import SPARSE_PRODUCT_EFFICIENCY

DENSE_TARGET = 0.6  # dense steps: at least this fraction of the measured GEMM rate (issue #17)


def matmul_rate(device: torch.device, rows: int, inner: int, cols: int, repeats: int = 2) -> float:
    """Measured float32 GEMM rate `[rows, inner] x [inner, cols]`, flops per second (best of `repeats`)."""
    a = torch.randn(rows, inner, device=device)
    b = torch.randn(inner, cols, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2.0 * rows * inner * cols / best


def product_rates(mask, dim: int, device: torch.device, rounds: int = 3) -> dict:
    """
    The two products of the cost model on this mask, alternating, best of `rounds`: the dense GEMM
    `[2048, D] x [D, D]` and the CSR product of the sparser of M and 1 - M (transposed) with `[D, 2048]`, in flops
    per second; their ratio is what `pca_mask.SPARSE_PRODUCT_EFFICIENCY` states.
    """
    support = mask.mask if mask.nonzero_fraction <= 0.5 else ~mask.mask
    csr = support.T.to(torch.float32).to_sparse_csr()
    weights = mask.mask.to(torch.float32)
    z = torch.randn(DENSE_PIECE_ROWS, dim, device=device)
    z_t = z.T.contiguous()
    best = {"dense": float("inf"), "sparse": float("inf")}
    for _ in range(rounds):
        for name, product in (("dense", lambda: z @ weights), ("sparse", lambda: csr @ z_t)):
            synchronize(device)
            start = time.perf_counter()
            product()
            synchronize(device)
            best[name] = min(best[name], time.perf_counter() - start)
    nonzero = int(support.sum())
    return {
        "gemm_gflops": 2.0 * DENSE_PIECE_ROWS * dim * dim / best["dense"] / 1e9,
        "csr_gflops": 2.0 * DENSE_PIECE_ROWS * nonzero / best["sparse"] / 1e9,
        "csr_density": nonzero / support.numel(),
    }


def path_flops(mask, batch_size: int, num_images: int, dim: int) -> float:
    """Flops of the product that evaluates the logits on the path taken (the softmax's element-wise work aside)."""
    per_image = {
        "ones": 2.0 * batch_size * dim,  # [B, D] x [D, n]
        "dense": 2.0 * batch_size * dim * dim,  # [B n, D] x [D, D]
        "sparse": 2.0 * batch_size * mask.nonzero_fraction * dim * dim,  # CSR M^T (nnz) x [D, B n]
        "complement": 2.0 * batch_size * (1 - mask.nonzero_fraction) * dim * dim + batch_size * dim,
    }
    if mask.path == "tiles":
        flops = sum(
            2.0 * (dim if q_idx is None else len(q_idx)) * len(p_idx) * (batch_size + 1)
            for p_idx, q_idx, _ in mask.tiles
        )
    else:
        flops = per_image[mask.path]
    return flops * num_images


class PeakMemory:
    """Peak extra memory of a block: CUDA allocator peak on a GPU, sampled resident set size on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.peak = 0

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def _sample(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, self._rss() - self.base)
            time.sleep(0.002)

    def __enter__(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self.base = torch.cuda.memory_allocated(self.device)
        else:
            self.base = self._rss()
            self._stop = threading.Event()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak = torch.cuda.max_memory_allocated(self.device) - self.base
        else:
            self._stop.set()
            self._thread.join()
            self.peak = max(self.peak, self._rss() - self.base)


def run_one(num_images, threshold, args, device):
    data = load_builtin("patches", size=args.size, num_images=num_images, seed=0)
    denoiser = PCALocalityDenoiser.from_dataset(
        data, show_progress=False, mask_threshold=threshold, chunk_size=args.chunk_size
    ).to(device)
    dim = denoiser.eigvecs.shape[0]
    scheduler = DDIMScheduler()
    scheduler.set_timesteps(args.steps)
    generator = torch.Generator(device="cpu").manual_seed(0)
    sample = torch.randn(args.batch_size, *denoiser.sample_shape, generator=generator).to(device)
    rows = []
    print(f"\nN = {num_images}, D = {dim}, B = {args.batch_size}, mask_threshold = {threshold}")
    print(
        f"{'t':>5} {'path':>10} {'nnz %':>6} {'mask s':>7} {'step s':>7} {'GFLOP':>7} {'GEMM GF/s':>9} "
        f"{'of GEMM':>7} {'dense s':>8} {'vs dense':>8} {'peak MB':>8}"
    )
    for t in scheduler.timesteps:
        # the GEMM rate of the dense path's shape, measured now, beside the step (shared machines drift)
        rate = matmul_rate(device, DENSE_PIECE_ROWS, dim, dim)
        alpha_prod = float(denoiser.alphas_cumprod[int(t)])
        with PeakMemory(device) as memory:
            synchronize(device)
            start = time.perf_counter()
            mask = denoiser.locality_mask(alpha_prod, args.batch_size)
            synchronize(device)
            mask_seconds = time.perf_counter() - start
            output = denoiser(sample, t)
            synchronize(device)
            step_seconds = time.perf_counter() - start - mask_seconds
        sample = scheduler.step(output.sample, t, sample).prev_sample
        rates = product_rates(mask, dim, device) if args.product_rates and mask.path != "ones" else None
        flops = path_flops(mask, args.batch_size, num_images, dim)
        dense_seconds = 2.0 * args.batch_size * num_images * dim * dim / rate  # the dense formulation at the rate
        rows.append(
            {
                "timestep": int(t),
                "path": mask.path,
                "nonzero_fraction": mask.nonzero_fraction,
                "mask_s": mask_seconds,
                "step_s": step_seconds,
                "flops": flops,
                "gemm_gflops": rate / 1e9,
                "fraction_of_gemm": flops / step_seconds / rate,
                "dense_s": dense_seconds,
                "peak_mb": memory.peak / 2**20,
                "product_rates": rates,
            }
        )
        row = rows[-1]
        print(
            f"{row['timestep']:>5} {row['path']:>10} {100 * row['nonzero_fraction']:>6.1f} {row['mask_s']:>7.3f} "
            f"{row['step_s']:>7.3f} {flops / 1e9:>7.0f} {row['gemm_gflops']:>9.0f} {row['fraction_of_gemm']:>7.2f} "
            f"{dense_seconds:>8.3f} {dense_seconds / step_seconds:>7.2f}x {row['peak_mb']:>8.0f}",
            flush=True,
        )
        if rates is not None:
            ratio = rates["csr_gflops"] / rates["gemm_gflops"]
            print(
                f"{'':>5} products alone: GEMM {rates['gemm_gflops']:.0f} GFLOP/s, CSR of the "
                f"{100 * rates['csr_density']:.1f}% sparser side {rates['csr_gflops']:.1f} GFLOP/s, ratio {ratio:.3f} "
                f"(cost model: {SPARSE_PRODUCT_EFFICIENCY['cpu']})",
                flush=True,
            )
    assert torch.isfinite(sample).all()
    return {"num_images": num_images, "threshold": threshold, "dim": dim, "steps": rows}


def summarize(result, steps):
    """The 10-step total and the dense-step target: met, or the measured reason and the remaining factor."""
    rows = result["steps"]
    total = sum(row["mask_s"] + row["step_s"] for row in rows)
    masks = sum(row["mask_s"] for row in rows)
    rates = [row["gemm_gflops"] for row in rows]
    print(
        f"total {steps} steps: {total:.2f} s (masks {masks:.2f} s; GEMM rate over the run {min(rates):.0f}-"
        f"{max(rates):.0f} GFLOP/s; the dense formulation at every non-ones step would take "
        f"{sum(row['dense_s'] for row in rows if row['path'] != 'ones'):.2f} s)"
    )
    for row in rows:
        if row["path"] != "dense":
            continue
        fraction = row["fraction_of_gemm"]
        with_mask = row["flops"] / (row["step_s"] + row["mask_s"]) / (row["gemm_gflops"] * 1e9)
        verdict = "met" if fraction >= DENSE_TARGET else f"NOT met, remaining factor {DENSE_TARGET / fraction:.2f}"
        print(
            f"  t = {row['timestep']:>3} dense: {fraction:.2f} of the GEMM rate (with its mask {with_mask:.2f}); "
            f"target {DENSE_TARGET}: {verdict}"
        )
    result["total_s"] = total
    return result


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.02])
    parser.add_argument("--size", type=int, default=32, help="patch side; D = 3 * size^2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument(
        "--product-rates",
        action="store_true",
        help="per step, also time the dense GEMM and the CSR product alone on its mask (the cost model's rate ratio)",
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "pca_locality.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device {device}, threads {torch.get_num_threads()}, load average {os.getloadavg()}")
    results = []
    for num_images in args.num_images:
        for threshold in args.thresholds:
            results.append(summarize(run_one(num_images, threshold, args, device), args.steps))
    print(f"load average {os.getloadavg()}")
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"device": str(device), "batch_size": args.batch_size, "runs": results}, f, indent=1)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
