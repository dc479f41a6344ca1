"""Per-call time and peak memory of the exact optimal denoiser on natural-image patches, against the GEMM floor.

Each call of the exact path does two GEMMs over all N images (logits, then the weighted sum): 4 B N D flops. The
floor is that count over this machine's float32 matmul rate, measured in the same run (a square matmul with the
same threads). "fraction" = floor / measured time (1.0 = as fast as a big square GEMM). Peak memory is the growth of
the peak RSS during one call, the second of its setting (the first leaves the BLAS library's per-shape workspace),
(Linux `/proc/self/clear_refs` + `VmHWM`), measured in a child process that runs with
`MALLOC_MMAP_THRESHOLD_=65536` so that freed buffers go back to the OS and RSS tracks live memory; it is compared
with the bound one piece of images (2 MB) + O(B chunk + B D) per stream ("bound MB"; the stored images are not
counted; a small batch reads one piece per block of images, see `kernels.empirical_cpu`).

The top-k rows (`num_neighbors=k`, FAISS flat index) report the relative error against the exact result, which is
what top-k costs in accuracy at high noise, where the posterior is broad.

"vs ref" compares with the research reference's exact method timed in the same run on the same inputs
(`reference_posterior_mean`: a FAISS flat search with k = N, a gather of the N neighbours of every query, a softmax
over them; batch 8 and N <= 10000 only, its neighbour tensor is B N D floats), so the ratio does not depend on which
machine ran the table; "ref err" is that result's relative difference from ours (both are exact: float32 rounding).
The reference's 0.44 s (N = 10000, D = 3072, B = 8) was measured on another machine of this kind; "vs 0.44 s"
divides by it.

    python benchmarks/bench_optimal.py                       # N = 2000, 10000, 50000; B = 8, 64; uint8 storage
    python benchmarks/bench_optimal.py --threads 1 --clock cpu --storage-dtypes uint8 float32   # on a shared machine
    python benchmarks/bench_optimal.py --num-images 10000 --batch-sizes 8 --top-k 50 200

Results: a table on stdout and `benchmarks/results/bench_optimal.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from functools import partial
from pathlib import Path

import torch

import diffusers_analytic as da
from diffusers_analytic.data import to_model_space
from diffusers_analytic.kernels import empirical_cpu, stored_images

REFERENCE_SECONDS = 0.44  # the research reference's exact optimal denoiser, N = 10000, D = 3072, B = 8
D = 3 * 32 * 32


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--num-images", type=int, nargs="+", default=[2000, 10000, 50000])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--timesteps", type=int, nargs="+", default=[999, 500], help="999: broad (dense) posterior")
    parser.add_argument(
        "--storage-dtypes",
        nargs="+",
        default=["uint8"],
        choices=["uint8", "float16", "float32"],
        help="image storage to time (float32: no per-call conversion, 4x the memory)",
    )
    parser.add_argument("--chunk-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3, help="timed calls per setting (the minimum is reported)")
    parser.add_argument("--top-k", type=int, nargs="*", default=[200], help="k of the top-k rows (none: skip)")
    parser.add_argument("--top-k-max-images", type=int, default=10000, help="top-k rows only up to this N")
    parser.add_argument(
        "--no-reference", action="store_true", help="skip timing the reference's method (FAISS k = N + gather)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        default="wall",
        help="wall: elapsed time; cpu: this process's CPU time (with --threads 1, a fair measure on a shared machine)",
    )
    parser.add_argument("--output", default=str(Path(__file__).parent / "results" / "bench_optimal.json"))
    parser.add_argument("--memory-only", action="store_true", help=argparse.SUPPRESS)  # the child process
    return parser.parse_args()


def matmul_rate(size: int = 2048, repeats: int = 5) -> float:
    """float32 GFLOP/s of a square matmul (best of `repeats`)."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


class ReferenceOptimal:
    """
    The research reference's exact optimal denoiser, for timing beside ours: float32 images in
    memory and a FAISS flat L2 index over them (built here, not timed); a call searches x / sqrt(a) with k = N,
    gathers all N neighbours per query (`[B, N, D]`) and takes the softmax of -a d / (2 (1 - a)) over them.
    """

    def __init__(self, patches):
        import faiss

        self.images = to_model_space(patches.images.reshape(len(patches), -1), torch.float32)  # [N, D]
        self.index = faiss.IndexFlatL2(self.images.shape[1])
        self.index.add(self.images.numpy())

    def __call__(self, x: torch.Tensor, alpha_prod: float) -> torch.Tensor:
        query = (x.reshape(len(x), -1) / alpha_prod**0.5).numpy()
        distances, neighbors = self.index.search(query, len(self.images))
        logits = -torch.from_numpy(distances) * alpha_prod / (2 * (1 - alpha_prod))  # [B, N]
        weights = torch.softmax(logits, dim=1)
        return torch.einsum("bn,bnd->bd", weights, self.images[torch.from_numpy(neighbors)])  # x0_hat  [B, D]


CLOCK = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _timed(fn) -> float:
    start = _clock()
    fn()
    return _clock() - start


def _rss_kib(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field):
                return int(line.split()[1])
    return -1


def peak_extra_memory_mb(fn) -> float | None:
    """Growth of the peak RSS while `fn` runs, in MB (None where /proc/self/clear_refs is unavailable)."""
    try:
        with open("/proc/self/clear_refs", "w") as refs:
            refs.write("5")  # reset VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_kib("VmRSS:")
    fn()
    return (_rss_kib("VmHWM:") - before) / 1024


def settings(args):
    """(N, patches, storage, denoiser, B, x, t) for every timed setting, in table order."""
    for num_images in args.num_images:
        patches = da.load_builtin("patches", size=32, num_images=num_images)
        for storage in args.storage_dtypes:
            denoiser = da.OptimalDenoiser.from_dataset(patches, storage_dtype=storage, chunk_size=args.chunk_size)
            denoiser.denoise(torch.randn(1, 3, 32, 32), 500)  # derived statistics (mean, norms) once
            for batch_size in args.batch_sizes:
                x = torch.randn(batch_size, 3, 32, 32, generator=torch.Generator().manual_seed(0))
                for timestep in args.timesteps:
                    yield num_images, patches, storage, denoiser, batch_size, x, timestep


def measure_memory(args) -> None:
    """Child process: peak extra memory (MB) of one call per setting, printed as one JSON list."""
    peaks = []
    for _, _, _, denoiser, _, x, timestep in settings(args):
        # One call first: the BLAS library keeps per-shape workspace after its first GEMM of a shape (a few MB, once
        # per process), which is not memory of the call.
        denoiser.denoise(x, timestep)
        peaks.append(peak_extra_memory_mb(partial(denoiser.denoise, x, timestep)))
    print(json.dumps(peaks))


def memory_in_child(args) -> list:
    argv = [
        sys.executable,
        __file__,
        "--memory-only",
        "--num-images",
        *map(str, args.num_images),
        "--batch-sizes",
        *map(str, args.batch_sizes),
        "--timesteps",
        *map(str, args.timesteps),
        "--storage-dtypes",
        *args.storage_dtypes,
        "--chunk-size",
        str(args.chunk_size),
    ]
    if args.threads:
        argv += ["--threads", str(args.threads)]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main():
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_only:
        measure_memory(args)
        return
    global _clock
    _clock = CLOCK[args.clock]
    rate = matmul_rate()
    rows = []
    print(f"float32 matmul rate: {rate:.1f} GFLOP/s ({torch.get_num_threads()} threads, {args.clock} clock)")
    header = (
        f"{'N':>6} {'B':>3} {'storage':>7} {'t':>4} {'mode':>8} {'ms/call':>9} {'floor ms':>9} {'fraction':>8} "
        f"{'peak MB':>8} {'bound MB':>8} {'ref ms':>7} {'vs ref':>7} {'ref err':>8} {'vs 0.44 s':>9} {'rel err':>8}"
    )
    print(header)
    print("-" * len(header))
    references, reference_seconds = {}, {}  # per N: the reference's denoiser; per (N, B, t): its time
    for num_images, patches, storage, denoiser, batch_size, x, timestep in settings(args):
        call = partial(denoiser.denoise, x, timestep)
        exact = call()
        seconds = min(_timed(call) for _ in range(args.repeats))
        reference = {"seconds": None, "error": None}
        if not args.no_reference and batch_size <= 8 and num_images <= 10000:
            if num_images not in references:
                references[num_images] = ReferenceOptimal(patches)
            ref_call = partial(references[num_images], x, float(denoiser.alphas_cumprod[timestep]))
            ref_x0 = ref_call()
            key = (num_images, batch_size, timestep)
            if key not in reference_seconds:
                reference_seconds[key] = min(_timed(ref_call) for _ in range(max(1, min(args.repeats, 3))))
            exact_flat = exact.reshape(len(x), -1)
            reference = {
                "seconds": reference_seconds[key],
                "error": ((ref_x0 - exact_flat).norm() / exact_flat.norm()).item(),
            }
        floor = 4 * batch_size * num_images * D / (rate * 1e9)
        piece = stored_images.PIECE_BYTES["cpu"]  # one piece of images as float32
        blocks = empirical_cpu.num_blocks(num_images, batch_size)  # blocks, each with its piece and buffers
        bound = blocks * (piece + 4 * batch_size * args.chunk_size * 4 + 8 * batch_size * D * 4) / 2**20
        row = {
            "num_images": num_images,
            "batch_size": batch_size,
            "storage_dtype": storage,
            "timestep": timestep,
            "mode": "exact",
            "seconds_per_call": seconds,
            "gemm_floor_seconds": floor,
            "fraction_of_matmul_rate": floor / seconds,
            "peak_extra_mb": None,
            "chunk_bound_mb": bound,
            "reference_seconds": reference["seconds"],
            "speedup_vs_reference": reference["seconds"] and reference["seconds"] / seconds,
            "reference_relative_error": reference["error"],
            "speedup_vs_design_reference": (
                REFERENCE_SECONDS / seconds if num_images == 10000 and batch_size == 8 else None
            ),
            "relative_error_vs_exact": 0.0,
        }
        rows.append(row)
        _print_row(row)
        if storage != args.storage_dtypes[0] or num_images > args.top_k_max_images:
            continue
        for k in args.top_k:
            top_k = da.OptimalDenoiser.from_dataset(
                patches, storage_dtype=storage, chunk_size=args.chunk_size, num_neighbors=k
            )
            top_k.denoise(x, timestep)  # builds the FAISS index (not timed)
            approx = top_k.denoise(x, timestep)
            seconds = min(_timed(partial(top_k.denoise, x, timestep)) for _ in range(args.repeats))
            error = ((approx - exact).norm() / exact.norm()).item()
            row = {
                "num_images": num_images,
                "batch_size": batch_size,
                "storage_dtype": storage,
                "timestep": timestep,
                "mode": f"top{k}",
                "seconds_per_call": seconds,
                "gemm_floor_seconds": None,
                "fraction_of_matmul_rate": None,
                "peak_extra_mb": None,
                "chunk_bound_mb": None,
                "reference_seconds": None,
                "speedup_vs_reference": None,
                "reference_relative_error": None,
                "speedup_vs_design_reference": None,
                "relative_error_vs_exact": error,
            }
            rows.append(row)
            _print_row(row)
    print("peak memory (child process) ...", flush=True)
    exact_rows = [row for row in rows if row["mode"] == "exact"]
    for row, peak in zip(exact_rows, memory_in_child(args)):
        row["peak_extra_mb"] = peak
        print(
            f"{row['num_images']:>6} {row['batch_size']:>3} {row['storage_dtype']:>7} {row['timestep']:>4}  "
            f"peak extra {peak:.1f} MB (bound {row['chunk_bound_mb']:.1f} MB)"
        )
    result = {
        "matmul_gflops": rate,
        "threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg(),
        "clock": args.clock,
        "machine": platform.machine(),
        "dim": D,
        "chunk_size": args.chunk_size,
        "design_reference_seconds": REFERENCE_SECONDS,
        "torch": torch.__version__,
        "rows": rows,
    }
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(json.dumps(result, indent=2))
    print(f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs; wrote {args.output}")


def _print_row(row):
    def fmt(value, pattern):
        return "-" if value is None else pattern.format(value)

    print(
        f"{row['num_images']:>6} {row['batch_size']:>3} {row['storage_dtype']:>7} {row['timestep']:>4} {row['mode']:>8} "
        f"{row['seconds_per_call'] * 1e3:>9.1f} {fmt(row['gemm_floor_seconds'] and row['gemm_floor_seconds'] * 1e3, '{:>9.1f}')} "
        f"{fmt(row['fraction_of_matmul_rate'], '{:>8.2f}')} {fmt(row['peak_extra_mb'], '{:>8.1f}')} "
        f"{fmt(row['chunk_bound_mb'], '{:>8.1f}')} "
        f"{fmt(row['reference_seconds'] and row['reference_seconds'] * 1e3, '{:>7.0f}')} "
        f"{fmt(row['speedup_vs_reference'], '{:>6.1f}x')} {fmt(row['reference_relative_error'], '{:>8.1e}')} "
        f"{fmt(row['speedup_vs_design_reference'], '{:>8.1f}x')} {fmt(row['relative_error_vs_exact'], '{:>8.1e}')}",
        flush=True,
    )


if __name__ == "__main__":
    main()
