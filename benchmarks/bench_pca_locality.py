"""Benchmark of the PCA-locality denoiser over the timesteps of a DDIM run.

For each data-set size N and mask threshold: per-step time (mask computation and denoising), peak extra memory, the
mask's non-zero fraction, and the cost of the dense formulation (B*N*D^2 multiply-adds at the float32 matmul rate
measured in the same run). Prints a table and writes JSON to benchmarks/results/.

    python benchmarks/bench_pca_locality.py                          # D = 3072, N = 2000 and 10000, B = 8
    python benchmarks/bench_pca_locality.py --num-images 500 --size 16 --steps 5    # quick run
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
from diffusers_analytic.models.denoiser_pca_locality import PCALocalityDenoiser

REFERENCE_SECONDS_PER_STEP = {2000: 2.8, 10000: 13.0}  # the research reference, 2-core CPU, B = 8, D = 3072


def matmul_rate(device: torch.device, rows: int, inner: int, cols: int, repeats: int = 2) -> float:
    """Measured float32 GEMM rate `[rows, inner] x [inner, cols]`, multiply-adds per second (best of `repeats`)."""
    a = torch.randn(rows, inner, device=device)
    b = torch.randn(inner, cols, device=device)
    best = float("inf")
    for _ in range(repeats):
        synchronize(device)
        start = time.perf_counter()
        a @ b
        synchronize(device)
        best = min(best, time.perf_counter() - start)
    return rows * inner * cols / best


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
        f"{'t':>5} {'nnz %':>7} {'tiles':>6} {'mask s':>8} {'step s':>8} {'dense s':>8} {'speed-up':>9} {'peak MB':>8}"
    )
    for t in scheduler.timesteps:
        # the dense formulation's B N D^2 multiply-adds at the rate of its GEMM shape, measured now (shared machines)
        rate = matmul_rate(device, args.batch_size * min(dim, 1024), dim, min(num_images, args.chunk_size))
        dense_seconds = args.batch_size * num_images * dim * dim / rate
        alpha_prod = float(denoiser.alphas_cumprod[int(t)])
        with PeakMemory(device) as memory:
            synchronize(device)
            start = time.perf_counter()
            mask = denoiser.locality_mask(alpha_prod, args.batch_size)
            synchronize(device)
            mask_seconds = time.perf_counter() - start
            output = denoiser(sample, t)
            synchronize(device)
            step_seconds = time.perf_counter() - start
        sample = scheduler.step(output.sample, t, sample).prev_sample
        rows.append(
            {
                "timestep": int(t),
                "nonzero_fraction": mask.nonzero_fraction,
                "num_tiles": len(mask.tiles),
                "mask_s": mask_seconds,
                "step_s": step_seconds,
                "dense_s": dense_seconds,
                "peak_mb": memory.peak / 2**20,
                "matmul_gflops": 2 * rate / 1e9,
            }
        )
        row = rows[-1]
        print(
            f"{row['timestep']:>5} {100 * row['nonzero_fraction']:>7.1f} {row['num_tiles']:>6} "
            f"{row['mask_s']:>8.3f} {row['step_s']:>8.3f} {row['dense_s']:>8.3f} "
            f"{row['dense_s'] / row['step_s']:>8.1f}x {row['peak_mb']:>8.0f}",
            flush=True,
        )
    assert torch.isfinite(sample).all()
    return {"num_images": num_images, "threshold": threshold, "dim": dim, "steps": rows}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-images", type=int, nargs="+", default=[2000, 10000])
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.02, 0.05])
    parser.add_argument("--size", type=int, default=32, help="patch side; D = 3 * size^2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--steps", type=int, default=10, help="DDIM steps")
    parser.add_argument("--chunk-size", type=int, default=1024)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output", default=os.path.join(os.path.dirname(__file__), "results", "pca_locality.json"))
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
    print(f"device {device}, threads {torch.get_num_threads()}")
    results = []
    for num_images in args.num_images:
        for threshold in args.thresholds:
            result = run_one(num_images, threshold, args, device)
            results.append(result)
            total = sum(row["step_s"] for row in result["steps"])
            dense_total = sum(row["dense_s"] for row in result["steps"])
            rates = [row["matmul_gflops"] for row in result["steps"]]
            result["total_s"], result["dense_total_s"] = total, dense_total
            line = (
                f"total {args.steps} steps: {total:.2f} s (dense formulation {dense_total:.2f} s at the measured "
                f"{min(rates):.0f}-{max(rates):.0f} GFLOP/s)"
            )
            reference = REFERENCE_SECONDS_PER_STEP.get(num_images)
            if reference is not None and result["dim"] == 3072 and args.batch_size == 8:
                line += f"; reference ~{reference * args.steps:.0f} s on an idle 2-core CPU"
            print(line, flush=True)
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump({"device": str(device), "batch_size": args.batch_size, "runs": results}, f, indent=1)
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
