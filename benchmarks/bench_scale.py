"""Every method at the sizes researchers use: CIFAR-10 and CelebA-HQ-64 scale (issue #17, item 5).

    python benchmarks/bench_scale.py                  # both scales, every method (tens of minutes on 2 cores)
    python benchmarks/bench_scale.py --quick          # the same code at small sizes: a smoke test (well under 1 min)
    python benchmarks/bench_scale.py --methods optimal wiener --scales cifar10 --budget-seconds 300

The data are crops of the built-in photos (`load_builtin("patches")`, uint8):

    cifar10      N = 50000, 32x32x3 (D = 3072)
    celebahq64   N = 30000, 64x64x3 (D = 12288)

For each scale and method: the fit (`from_dataset`), one `denoise` call at B = 64 (t = 500, after a B = 1 warm-up)
and a 16-image 50-step DDIM sample through `AnalyticDDIMPipeline` (`output_type="latent"`), each with its time and
its peak memory: the process's resident set at its highest during that work (polled every 5 ms; it includes the
loaded uint8 images and the fitted denoiser) and, in parentheses, its growth above the value at the start.

Nothing runs whose estimate exceeds `--budget-seconds` (default 600). The machine's rates are measured at the start
of the run: float32 and float64 GEMM (square matmuls of side 2048) and float64 `eigh` (side 2048, counted as 9 n^3
flops, so its rate is an effective one). Before each piece of work:

- fit: Wiener and PCA locality form the D x D float64 covariance (2 N D^2 flops) and decompose it (9 D^3 flops):
  the flops at the float64 GEMM rate are printed, and the decision takes the covariance at that rate and the `eigh`
  at the measured `eigh` rate; the other methods only store the images;
- call: the denoiser's `estimated_flops(64)` at the float32 GEMM rate; for a method that stores the images, unless
  that estimate is over 64 budgets, a probe replaces it: the method fitted on N / 64 of them, one B = 64 call timed
  (after a B = 1 warm-up) and multiplied by 64 (the calls stream over the stored images, so linear in N). The flop
  count alone misleads both ways: the patch methods run far below the GEMM rate, and some counts are upper bounds;
- sample: 50 x `estimated_flops(16)` at the float32 rate (no sample when the B = 64 call was skipped: 50 calls at
  B = 16 are 12.5 calls at B = 64); while it runs, a step callback stops it once (elapsed / steps done) x 50 exceeds
  the budget, from 5% of the budget on.

Skipped work prints its flop count and its estimated time at the measured rate and at the pipeline's assumed GPU
rate (`kernels.cost.GPU_FLOPS`, 50 TFLOP/s, a data-center GPU in float32 with TF32 matmuls; used for the float64 fit too, which
only a data-center GPU's float64 units approach). For skipped samples the run also checks that the pipeline logs its
long-run warning before the first denoiser call (a forward pre-hook stops it there), and whether a direct `denoise`
call logs anything before its work starts.

The table goes to stdout (markdown), the JSON to `benchmarks/results/bench_scale-<time>.json`, rewritten after every
method so that an interrupted run keeps its rows.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import sys
import time
from datetime import datetime, timezone

import torch
from run_benchmarks import RESULTS_DIR, PeakMemory, machine_description, noisy_batch

from diffusers_analytic import AnalyticDDIMPipeline, load_builtin
from diffusers_analytic.kernels.cost import GPU_FLOPS, eigh_flops
from diffusers_analytic.kernels.moments import symmetric_eigh
from diffusers_analytic.pipelines.pipeline_analytic_ddim import scheduler_from_denoiser
from diffusers_analytic.registry import DENOISERS

SCALES = {"cifar10": (32, 50000), "celebahq64": (64, 30000)}  # name: (side, N)
QUICK_SCALES = {"cifar10": (8, 400), "celebahq64": (12, 200)}  # --quick: the same code, small
COVARIANCE_METHODS = ("wiener", "pca_locality")  # fits with a D x D covariance and its eigendecomposition
METHOD_ORDER = ("wiener", "nearest_dataset", "optimal", "scfdm", "ls", "pca_locality", "els")  # cheap calls first
CALL_BATCH, CALL_TIMESTEP = 64, 500
SAMPLE_BATCH, SAMPLE_STEPS = 16, 50
PROBE_FRACTION = 64  # the call probe fits the method on N / 64 images


def log(message: str) -> None:
    print(f"[{datetime.now(timezone.utc):%H:%M:%S}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- machine rates
def best_seconds(fn, min_seconds: float = 1.0, max_repeats: int = 10) -> float:
    """Fastest of repeated calls of `fn` (after one warm-up) until `min_seconds` are spent."""
    fn()
    best, spent, repeats = float("inf"), 0.0, 0
    while spent < min_seconds and repeats < max_repeats:
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        best, spent, repeats = min(best, elapsed), spent + elapsed, repeats + 1
    return best


def measure_rates(gemm_size: int = 2048, eigh_size: int = 2048) -> dict:
    """float32 / float64 GEMM rates and the effective float64 `eigh` rate (9 n^3 flops), in flop/s."""
    rates = {}
    for name, dtype in (("gemm_float32", torch.float32), ("gemm_float64", torch.float64)):
        a, b = torch.randn(gemm_size, gemm_size, dtype=dtype), torch.randn(gemm_size, gemm_size, dtype=dtype)
        rates[name] = 2.0 * gemm_size**3 / best_seconds(lambda a=a, b=b: a @ b)
    x = torch.randn(eigh_size, eigh_size, dtype=torch.float64)
    covariance = x @ x.T / eigh_size
    rates["eigh_float64"] = eigh_flops(eigh_size) / best_seconds(lambda: symmetric_eigh(covariance), max_repeats=2)
    return rates


# ---------------------------------------------------------------------------------------------- estimates
def estimate(flops: float, rate: float, how: str = "flops at the measured rate") -> dict:
    """An estimate of one piece of work: its flop count and its time here and at the assumed GPU rate."""
    seconds = flops / rate
    return {"flops": flops, "seconds": seconds, "flop_seconds": seconds, "gpu_seconds": flops / GPU_FLOPS, "how": how}


def fit_estimate(method: str, num_images: int, dim: int, rates: dict) -> dict | None:
    """2 N D^2 float64 flops for the covariance and 9 D^3 for its `eigh`; None for a fit that stores the images."""
    if method not in COVARIANCE_METHODS:
        return None
    covariance, eigh = 2.0 * num_images * dim**2, eigh_flops(dim)
    result = estimate(covariance + eigh, rates["gemm_float64"])  # all at the float64 GEMM rate
    result["seconds"] = covariance / rates["gemm_float64"] + eigh / rates["eigh_float64"]  # what decides
    result["how"] = "covariance at the float64 GEMM rate + eigh at the measured eigh rate"
    return result


def unfitted_flops(method: str, side: int, num_images: int, batch_size: int) -> float | None:
    """`estimated_flops` of a denoiser built on the meta device (shapes only), for a method whose fit is skipped."""
    kwargs = {"sample_size": side, "in_channels": 3, "num_images": num_images}
    try:
        with torch.device("meta"):
            denoiser = DENOISERS[method](**kwargs)
        return denoiser.estimated_flops(batch_size)
    except (TypeError, RuntimeError):  # no `num_images` in its config, or an estimate that reads fitted values
        return None


def describe(item: dict) -> str:
    text = (
        f"{item['flops']:.3g} flop = {item['flop_seconds']:.3g} s at the measured rate, {item['gpu_seconds']:.3g} s "
        f"at {GPU_FLOPS / 1e12:.0f} TFLOP/s"
    )
    if item["seconds"] != item["flop_seconds"]:
        text += f"; {item['how']}: est. {item['seconds']:.3g} s here"
    return text


# ---------------------------------------------------------------------------------------------- fail-fast checks
class CapturedWarnings(logging.Handler):
    """Collects the warnings logged by any `diffusers_analytic` module while the `with` block runs."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.logger, self.messages = logging.getLogger("diffusers_analytic"), []

    def emit(self, record):
        self.messages.append(record.getMessage())

    def __enter__(self):
        self.logger.addHandler(self)
        return self

    def __exit__(self, *exc):
        self.logger.removeHandler(self)
        return False


class StopBeforeWork(Exception):
    pass


def _raise_stop(*args, **kwargs):
    raise StopBeforeWork


def warnings_before_start(denoiser) -> dict:
    """
    What a user gets before a long run starts: the pipeline (16 images, 50 steps) stopped by a forward pre-hook at
    its first denoiser call, and a direct `denoise` call at B = 64 stopped where the closed form would start.
    """
    pipe = AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler_from_denoiser(denoiser))
    pipe.set_progress_bar_config(disable=True)
    hook = denoiser.register_forward_pre_hook(_raise_stop)
    with CapturedWarnings() as pipeline_warnings:
        try:
            pipe(batch_size=SAMPLE_BATCH, num_inference_steps=SAMPLE_STEPS, output_type="latent")
        except StopBeforeWork:
            pass
    hook.remove()
    denoiser._denoise = _raise_stop  # the instance attribute shadows the method until deleted
    with CapturedWarnings() as call_warnings:
        try:
            denoiser.denoise(torch.zeros(CALL_BATCH, *denoiser.sample_shape), CALL_TIMESTEP)
        except StopBeforeWork:
            pass
    del denoiser._denoise
    return {"pipeline_warning": pipeline_warnings.messages, "denoise_warning": call_warnings.messages}


# ---------------------------------------------------------------------------------------------- the work
def peak_mb(memory: PeakMemory) -> tuple[float, float]:
    """`(highest resident set of the process, its growth above the start)` in MB during a `PeakMemory` block."""
    return (memory._start + memory.peak_bytes) / 2**20, memory.peak_bytes / 2**20


def fit(method: str, images: torch.Tensor):
    """`(denoiser, seconds, peak MB, warnings logged)` of `from_dataset`."""
    with PeakMemory(torch.device("cpu")) as memory, CapturedWarnings() as warnings:
        start = time.perf_counter()
        denoiser = DENOISERS[method].from_dataset(images, show_progress=False)
        seconds = time.perf_counter() - start
    return denoiser, seconds, peak_mb(memory), warnings.messages


def call_estimate(method: str, denoiser, images: torch.Tensor, rates: dict, budget: float) -> dict:
    """
    `estimated_flops(64)` at the float32 GEMM rate; for a method that stores the images, when the probe itself fits
    the budget, the measured N / 64 probe replaces it (the flop count is a lower bound for some methods, an upper
    one for others).
    """
    result = estimate(denoiser.estimated_flops(CALL_BATCH), rates["gemm_float32"])
    stored = getattr(denoiser, "images", None)
    num_probe = max(2, math.ceil(len(images) / PROBE_FRACTION))
    probe_fit = fit_estimate(method, num_probe, int(images[0].numel()), rates)
    probe_cost = result["seconds"] * num_probe / len(images) + (probe_fit["seconds"] if probe_fit else 0.0)
    if stored is None or len(stored) != len(images) or probe_cost > budget:
        return result
    subset = images[:num_probe]
    probe = fit(method, subset)[0]
    x_t = noisy_batch(subset, probe, CALL_BATCH, CALL_TIMESTEP, torch.Generator().manual_seed(0))
    probe.denoise(x_t[:1], CALL_TIMESTEP)  # warm-up, as before the timed call: caches that do not grow with N
    start = time.perf_counter()
    probe.denoise(x_t, CALL_TIMESTEP)
    probe_seconds = time.perf_counter() - start
    result["seconds"] = probe_seconds * len(images) / num_probe
    result["how"] = f"one B = {CALL_BATCH} call on {num_probe} images {probe_seconds:.3g} s, x N / {num_probe}"
    log(f"  probe: {result['how']} -> {result['seconds']:.3g} s")
    return result


def time_call(denoiser, images: torch.Tensor) -> tuple[float, float]:
    x_t = noisy_batch(images, denoiser, CALL_BATCH, CALL_TIMESTEP, torch.Generator().manual_seed(0))
    denoiser.denoise(x_t[:1], CALL_TIMESTEP)  # warm-up: one-off caches (operators, masks, patch positions)
    with PeakMemory(torch.device("cpu")) as memory:
        start = time.perf_counter()
        denoiser.denoise(x_t, CALL_TIMESTEP)
        seconds = time.perf_counter() - start
    return seconds, peak_mb(memory)


class OverBudget(Exception):
    pass


def time_sample(denoiser, budget: float) -> dict:
    """
    The 16-image 50-step sample; stopped once its projected time exceeds `budget` (from 5% of the budget on, so that
    a slow first step cannot stop a short run).
    """
    pipe = AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler_from_denoiser(denoiser))
    pipe.set_progress_bar_config(disable=True)
    start = None

    def guard(pipe, step, timestep, callback_kwargs):
        elapsed = time.perf_counter() - start
        projected = elapsed * SAMPLE_STEPS / (step + 1)
        if projected > budget and elapsed > 0.05 * budget:
            raise OverBudget(f"stopped after {step + 1} steps: projected {projected:.3g} s")
        return callback_kwargs

    result = {}
    with PeakMemory(torch.device("cpu")) as memory, CapturedWarnings() as warnings:
        start = time.perf_counter()
        try:
            pipe(
                batch_size=SAMPLE_BATCH,
                num_inference_steps=SAMPLE_STEPS,
                generator=torch.Generator().manual_seed(0),
                output_type="latent",
                callback_on_step_end=guard,
            )
            result["sample_s"] = time.perf_counter() - start
        except OverBudget as stop:
            result["sample_stopped"] = str(stop)
    result["sample_peak_mb"], result["sample_growth_mb"] = peak_mb(memory)
    result["sample_pipeline_warning"] = warnings.messages
    return result


def benchmark(method: str, scale: str, images: torch.Tensor, rates: dict, budget: float) -> dict:
    num_images, dim = len(images), int(images[0].numel())
    row = {"method": method, "scale": scale, "N": num_images, "D": dim, "notes": []}
    log(f"{method} at {scale} (N = {num_images}, D = {dim})")

    # 1. The fit.
    row["fit_estimate"] = fit_estimate(method, num_images, dim, rates)
    if row["fit_estimate"] is not None and row["fit_estimate"]["seconds"] > budget:
        row["notes"].append(f"fit skipped: {describe(row['fit_estimate'])}; no call or sample")
        for stage, batch_size, calls in (("call", CALL_BATCH, 1), ("sample", SAMPLE_BATCH, SAMPLE_STEPS)):
            flops = unfitted_flops(method, images.shape[-1], num_images, batch_size)
            if flops is not None:
                row[f"{stage}_estimate"] = estimate(calls * flops, rates["gemm_float32"])
                row["notes"].append(f"{stage}: {describe(row[f'{stage}_estimate'])}")
        log("  " + "; ".join(row["notes"]))
        return row
    denoiser, row["fit_s"], (row["fit_peak_mb"], row["fit_growth_mb"]), row["fit_warning"] = fit(method, images)
    log(f"  fit {row['fit_s']:.3g} s, peak {row['fit_peak_mb']:.0f} MB")

    # 2. One denoise call at B = 64.
    row["call_estimate"] = call_estimate(method, denoiser, images, rates, budget)
    if row["call_estimate"]["seconds"] > budget:
        row["notes"].append(f"call skipped: {describe(row['call_estimate'])}")
        log(f"  {row['notes'][-1]}")
    else:
        log(f"  call: {describe(row['call_estimate'])}; running it")
        row["call_s"], (row["call_peak_mb"], row["call_growth_mb"]) = time_call(denoiser, images)
        log(f"  call {row['call_s']:.3g} s, peak {row['call_peak_mb']:.0f} MB")

    # 3. The 16-image 50-step sample.
    row["sample_estimate"] = estimate(SAMPLE_STEPS * denoiser.estimated_flops(SAMPLE_BATCH), rates["gemm_float32"])
    if "call_s" not in row or row["sample_estimate"]["seconds"] > budget:  # (50 x B = 16 is 12.5 B = 64 calls)
        row["notes"].append(f"sample skipped: {describe(row['sample_estimate'])}")
        log(f"  {row['notes'][-1]}")
        row.update(warnings_before_start(denoiser))
        row["notes"].append(
            f"pipeline warned before its first call: {'yes' if row['pipeline_warning'] else 'NO'}; "
            f"direct denoise: {'yes' if row['denoise_warning'] else 'no warning'}"
        )
    else:
        log(f"  sample: {describe(row['sample_estimate'])}; running it, stopped if its projection passes {budget:g} s")
        row.update(time_sample(denoiser, budget))
        if "sample_stopped" in row:
            row["notes"].append(f"sample {row['sample_stopped']} (budget {budget:g} s)")
        log(f"  sample {row.get('sample_s', row.get('sample_stopped'))}, peak {row['sample_peak_mb']:.0f} MB")
    del denoiser
    gc.collect()
    return row


# ---------------------------------------------------------------------------------------------- table
def cell(row: dict, key: str, fmt: str) -> str:
    """A measured value; for a skipped time its estimate in parentheses, "stopped" for a sample stopped early."""
    stage = key.split("_")[0]  # fit, call or sample
    if key in row and key.endswith("_peak_mb"):
        return f"{row[key]:.0f} (+{row[f'{stage}_growth_mb']:.0f})"
    if key in row:
        return fmt.format(row[key])
    if key.endswith("_s") and stage == "sample" and "sample_stopped" in row:
        return "stopped"
    if key.endswith("_s") and row.get(f"{stage}_estimate") is not None:
        return f"(est. {row[f'{stage}_estimate']['seconds']:.2g})"
    return "-"


def format_table(rows: list[dict]) -> str:
    columns = [
        ("fit_s", "fit s", "{:.3g}"),
        ("fit_peak_mb", "fit peak MB", None),
        ("call_s", "call B=64 s", "{:.3g}"),
        ("call_peak_mb", "call peak MB", None),
        ("sample_s", "50-step x16 s", "{:.3g}"),
        ("sample_peak_mb", "sample peak MB", None),
    ]
    header = ["method", "scale", "N", "D"] + [title for _, title, _ in columns] + ["note"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["method"], row["scale"], str(row["N"]), str(row["D"])]
        cells += [cell(row, key, fmt) for key, _, fmt in columns]
        cells.append("; ".join(row["notes"]))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHOD_ORDER), choices=sorted(DENOISERS))
    parser.add_argument("--scales", nargs="+", default=list(SCALES), choices=list(SCALES))
    parser.add_argument(
        "--budget-seconds", type=float, default=None, help="skip work estimated longer (600; --quick 3)"
    )
    parser.add_argument("--quick", action="store_true", help="8x8x3 N=400 and 12x12x3 N=200: a smoke test")
    parser.add_argument(
        "--output", default=None, help="JSON path (default benchmarks/results/bench_scale-<time>.json)"
    )
    args = parser.parse_args(argv)
    if args.budget_seconds is None:
        args.budget_seconds = 3.0 if args.quick else 600.0
    return args


def work_order(args, rates: dict) -> list[tuple[str, str]]:
    """`(scale, method)` pairs, cheap first: scale by scale, but fits estimated over a minute at the end."""
    scales = QUICK_SCALES if args.quick else SCALES
    pairs = [(scale, method) for scale in args.scales for method in METHOD_ORDER if method in args.methods]

    def key(pair):
        scale, method = pair
        side, num_images = scales[scale]
        fit_cost = fit_estimate(method, num_images, 3 * side * side, rates)
        return (fit_cost is not None and fit_cost["seconds"] > 60, args.scales.index(scale))

    return sorted(pairs, key=key)


def main(argv=None) -> None:
    args = parse_args(argv)
    scales = QUICK_SCALES if args.quick else SCALES
    machine = machine_description()
    rates = measure_rates(*((512, 512) if args.quick else (2048, 2048)))
    machine["rates_gflops"] = {name: round(rate / 1e9, 1) for name, rate in rates.items()}
    machine["assumed_gpu_gflops"] = GPU_FLOPS / 1e9
    log(f"machine: {machine}")
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    output = args.output or os.path.join(RESULTS_DIR, f"bench_scale-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)

    rows, loaded = [], {}
    for scale, method in work_order(args, rates):
        if scale not in loaded:
            loaded.clear()  # one scale's images in memory at a time
            side, num_images = scales[scale]
            loaded[scale] = load_builtin("patches", size=side, num_images=num_images).images
        rows.append(benchmark(method, scale, loaded[scale], rates, args.budget_seconds))
        with open(output, "w") as f:
            json.dump({"machine": machine, "budget_seconds": args.budget_seconds, "rows": rows}, f, indent=2)
    machine["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]

    order = {(scale, method): i for i, (scale, method) in enumerate((s, m) for s in scales for m in METHOD_ORDER)}
    rows.sort(key=lambda row: order[(row["scale"], row["method"])])
    with open(output, "w") as f:
        json.dump({"machine": machine, "budget_seconds": args.budget_seconds, "rows": rows}, f, indent=2)
    rates_line = ", ".join(f"{name} {rate / 1e9:.1f} GFLOP/s" for name, rate in rates.items())
    print(f"Measured: {rates_line}; assumed GPU rate {GPU_FLOPS / 1e12:.0f} TFLOP/s; budget {args.budget_seconds:g} s")
    print(f"Load average: start {machine['load_average_at_start']}, end {machine['load_average_at_end']}")
    print(format_table(rows))
    log(f"wrote {output}")


if __name__ == "__main__":
    main()
