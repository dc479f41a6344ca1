"""Speed and memory of every registered analytic denoiser: one table, one JSON file.

For each method and data set: fit time (`from_dataset`), per-step `denoise` time at batch 8 and 64 (mean over
t = 900, 500, 100), end-to-end 10-step DDIM sampling time at batch 8, peak memory above the row's starting point, and
the achieved fraction of this machine's measured float32 matmul rate (the method's dense flop count per call divided
by time, over the rate of a 2048^3 float32 matmul on the same device). GPU rows (float32, and TF32 matmuls) are added
when CUDA is present.

    python benchmarks/run_benchmarks.py                                  # default: a few minutes on 2 cores
    python benchmarks/run_benchmarks.py --num-patches 2000 10000 50000   # all sizes (long)
    python benchmarks/run_benchmarks.py --methods wiener --no-patches64

The table goes to stdout (markdown), the JSON to `benchmarks/results/benchmarks-<time>.json`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import sys
import threading
import time
from datetime import datetime, timezone

import torch
from timing import synchronize

from diffusers_analytic import AnalyticDDIMPipeline, load_builtin
from diffusers_analytic.data import to_model_space
from diffusers_analytic.registry import DENOISERS

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
TIMESTEPS = (900, 500, 100)


# ---------------------------------------------------------------------------------------------- machine
def machine_description() -> dict:
    info = {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cpu_model": platform.processor(),
    }
    try:
        with open("/proc/cpuinfo") as f:
            names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
        if names:
            info["cpu_model"] = names[0]
    except OSError:
        pass
    if hasattr(os, "getloadavg"):
        info["load_average_at_start"] = [round(x, 2) for x in os.getloadavg()]
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def matmul_rate(device: torch.device, size: int = 2048, seconds: float = 1.0) -> float:
    """Measured float32 matmul rate on `device` in flop/s (best of repeated size^3 products)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b  # warm-up
    synchronize(device)
    best, spent = float("inf"), 0.0
    while spent < seconds:
        start = time.perf_counter()
        a @ b
        synchronize(device)
        elapsed = time.perf_counter() - start
        best, spent = min(best, elapsed), spent + elapsed
    return 2.0 * size**3 / best


# ---------------------------------------------------------------------------------------------- memory
class PeakMemory:
    """Peak memory above the value at entry: CUDA allocator peak on GPU, resident set size (polled) on CPU."""

    def __init__(self, device: torch.device, interval: float = 0.005):
        self.device, self.interval = device, interval
        self.peak_bytes = 0

    @staticmethod
    def _rss() -> int:
        try:
            with open("/proc/self/statm") as f:
                return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
        except OSError:
            import resource

            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024

    def __enter__(self):
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._start = torch.cuda.memory_allocated(self.device)
            return self
        self._start = self._rss()
        self._peak = self._start
        self._stop = threading.Event()

        def poll():
            while not self._stop.is_set():
                self._peak = max(self._peak, self._rss())
                time.sleep(self.interval)

        self._thread = threading.Thread(target=poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            self.peak_bytes = torch.cuda.max_memory_allocated(self.device) - self._start
        else:
            self._stop.set()
            self._thread.join()
            self.peak_bytes = max(self._peak, self._rss()) - self._start
        return False


# ---------------------------------------------------------------------------------------------- flops
def denoise_flops(method: str, denoiser, batch_size: int) -> float | None:
    """
    Dense flop count of one `denoise` call (multiply-add = 2 flops), the yardstick of the achieved-rate column:
    wiener 4 B D r (project, expand); optimal 4 B N D (distances GEMM, weighted sum); nearest_dataset 2 B N D;
    scfdm num_noise times optimal; pca_locality 2 B N D^2 + 2 B N D (the dense masked distances of the formula,
    so a method exploiting the masks' sparsity may exceed 1). None for a method not listed.
    """
    channels, height, width = denoiser.sample_shape
    dim = channels * height * width
    config = denoiser.config
    num_images = config.get("num_images")
    if config.get("num_neighbors") is not None:  # approximate top-k: the dense count does not apply
        return None
    if method == "wiener":
        return 4.0 * batch_size * dim * denoiser.eigvecs.shape[1]
    if num_images is None:
        return None
    if method == "optimal":
        return 4.0 * batch_size * num_images * dim
    if method == "nearest_dataset":
        return 2.0 * batch_size * num_images * dim
    if method == "scfdm":
        return 4.0 * batch_size * num_images * dim * config.num_noise
    if method == "pca_locality":
        return 2.0 * batch_size * num_images * dim * dim + 2.0 * batch_size * num_images * dim
    return None


# ---------------------------------------------------------------------------------------------- one row
def noisy_batch(images: torch.Tensor, denoiser, batch_size: int, timestep: int, generator) -> torch.Tensor:
    """x_t = sqrt(a) y + sqrt(1 - a) eps for data images y: realistic inputs."""
    index = torch.randint(len(images), (batch_size,), generator=generator)
    y = to_model_space(images[index])
    a = float(denoiser.alphas_cumprod[timestep])
    return a**0.5 * y + (1 - a) ** 0.5 * torch.randn(y.shape, generator=generator)


def time_denoise(denoiser, images, batch_size, device, max_call_seconds) -> tuple[float, bool]:
    """Mean seconds per `denoise` call over TIMESTEPS (a warm-up call each first); (value, finished)."""
    generator = torch.Generator().manual_seed(0)
    times = []
    for t in TIMESTEPS:
        x_t = noisy_batch(images, denoiser, batch_size, t, generator).to(device)
        call_generator = torch.Generator(device=device).manual_seed(1)
        start = time.perf_counter()
        denoiser.denoise(x_t, t, generator=call_generator)  # warm-up (and the only call if slow)
        synchronize(device)
        first = time.perf_counter() - start
        if first > max_call_seconds:
            times.append(first)
            return statistics.fmean(times), False
        repeats = []
        while sum(repeats) < 0.5 and len(repeats) < 5:
            start = time.perf_counter()
            denoiser.denoise(x_t, t, generator=call_generator)
            synchronize(device)
            repeats.append(time.perf_counter() - start)
        times.append(statistics.median(repeats))
    return statistics.fmean(times), True


def benchmark_method(method, data_name, images, device_rows, rates, max_call_seconds) -> list[dict]:
    """Fits `method` once on the CPU, then times it on every device row; one result dict per row."""
    base = {"method": method, "data": data_name, "N": len(images), "D": int(images[0].numel())}
    print(f"  {method} on {data_name}: fitting ...", file=sys.stderr, flush=True)
    with PeakMemory(torch.device("cpu")) as fit_memory:
        start = time.perf_counter()
        denoiser = DENOISERS[method].from_dataset(images, show_progress=False)
        base["fit_s"] = time.perf_counter() - start
    base["fit_peak_mb"] = fit_memory.peak_bytes / 2**20
    base["buffers_mb"] = sum(b.numel() * b.element_size() for b in denoiser.buffers()) / 2**20

    rows = []
    for label, device, tf32 in device_rows:
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        print(f"  {method} on {data_name}: timing on {label} ...", file=sys.stderr, flush=True)
        row = {**base, "device": label}
        denoiser.to(device)
        with PeakMemory(device) as call_memory:
            for batch_size in (8, 64):
                seconds, finished = time_denoise(denoiser, images, batch_size, device, max_call_seconds)
                row[f"denoise_b{batch_size}_ms"] = seconds * 1e3
                flops = denoise_flops(method, denoiser, batch_size)
                row[f"matmul_fraction_b{batch_size}"] = None if flops is None else flops / seconds / rates[label]
                if not finished:
                    row["note"] = f"one call over {max_call_seconds:g} s: timed once, rest skipped"
                    break
            if "note" not in row:
                pipe = AnalyticDDIMPipeline(unet=denoiser)
                pipe.set_progress_bar_config(disable=True)
                generator = torch.Generator(device=device).manual_seed(0)
                start = time.perf_counter()
                pipe(batch_size=8, num_inference_steps=10, generator=generator, output_type="latent")
                synchronize(device)
                row["sample_10_steps_b8_s"] = time.perf_counter() - start
        row["denoise_peak_mb"] = call_memory.peak_bytes / 2**20
        torch.backends.cuda.matmul.allow_tf32 = False
        rows.append(row)
    del denoiser
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return rows


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=sorted(DENOISERS), choices=sorted(DENOISERS))
    parser.add_argument(
        "--num-patches",
        type=int,
        nargs="*",
        default=[2000],
        help="sizes N of the 32x32x3 patch sets for every method (add 10000 50000 for the long run)",
    )
    parser.add_argument(
        "--wiener-num-patches",
        type=int,
        nargs="*",
        default=[10000],
        help="extra 32x32x3 sizes for Wiener only (its per-call benchmark at D = 3072, N = 10000)",
    )
    parser.add_argument("--no-digits", action="store_true", help="skip the digits rows")
    parser.add_argument("--no-patches64", action="store_true", help="skip Wiener on 64x64x3 patches (N = 2000)")
    parser.add_argument("--no-gpu", action="store_true", help="CPU rows only even when CUDA is present")
    parser.add_argument(
        "--max-call-seconds",
        type=float,
        default=30.0,
        help="a method whose single call takes longer is timed once and its other columns skipped",
    )
    parser.add_argument("--output", default=None, help="JSON path (default benchmarks/results/benchmarks-<time>.json)")
    return parser.parse_args(argv)


def data_sets(args) -> list[tuple[str, torch.Tensor, list[str]]]:
    """`(name, uint8 images, methods)` for every benchmarked set."""
    sets = []
    if not args.no_digits:
        sets.append(("digits", load_builtin("digits").images, args.methods))
    sizes = sorted(set(args.num_patches) | set(args.wiener_num_patches))
    for size in sizes:
        methods = args.methods if size in args.num_patches else [m for m in args.methods if m == "wiener"]
        if methods:
            sets.append((f"patches32 N={size}", load_builtin("patches", size=32, num_images=size).images, methods))
    if not args.no_patches64 and "wiener" in args.methods:
        sets.append(("patches64 N=2000", load_builtin("patches", size=64, num_images=2000).images, ["wiener"]))
    return sets


def devices(args) -> list[tuple[str, torch.device, bool]]:
    """`(label, device, tf32)` rows to run."""
    rows = [("cpu", torch.device("cpu"), False)]
    if torch.cuda.is_available() and not args.no_gpu:
        rows += [("cuda", torch.device("cuda"), False), ("cuda-tf32", torch.device("cuda"), True)]
    return rows


def format_table(rows: list[dict]) -> str:
    columns = [
        ("method", "method", "{}"),
        ("data", "data", "{}"),
        ("D", "D", "{}"),
        ("device", "device", "{}"),
        ("fit_s", "fit s", "{:.2f}"),
        ("denoise_b8_ms", "step b8 ms", "{:.1f}"),
        ("denoise_b64_ms", "step b64 ms", "{:.1f}"),
        ("sample_10_steps_b8_s", "10-step b8 s", "{:.2f}"),
        ("fit_peak_mb", "fit peak MB", "{:.0f}"),
        ("denoise_peak_mb", "step peak MB", "{:.0f}"),
        ("matmul_fraction_b8", "matmul frac b8", "{:.3f}"),
        ("matmul_fraction_b64", "matmul frac b64", "{:.3f}"),
    ]
    lines = ["| " + " | ".join(title for _, title, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = []
        for key, _, fmt in columns:
            value = row.get(key)
            cells.append("-" if value is None else fmt.format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    machine = machine_description()
    rates = {}
    for label, device, tf32 in devices(args):
        if device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = tf32
        rates[label] = matmul_rate(device)
    torch.backends.cuda.matmul.allow_tf32 = False
    machine["float32_matmul_gflops"] = {label: round(rate / 1e9, 1) for label, rate in rates.items()}
    print(f"Machine: {machine}", file=sys.stderr)

    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    output = args.output or os.path.join(RESULTS_DIR, f"benchmarks-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    rows = []
    for data_name, images, methods in data_sets(args):
        for method in methods:
            rows += benchmark_method(method, data_name, images, devices(args), rates, args.max_call_seconds)
            with open(output, "w") as f:  # rewritten after every method: an interrupted run keeps its rows
                json.dump({"machine": machine, "timesteps": list(TIMESTEPS), "rows": rows}, f, indent=2)

    print(format_table(rows))
    print(f"Wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
