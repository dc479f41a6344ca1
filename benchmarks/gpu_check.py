"""One script for a GPU machine: the device tests on CUDA, every method timed at CIFAR-10 and 64x64 scale, faiss on
the GPU, and the CLI on a GPU. Finishes in a few minutes on one GPU; writes `gpu_check.json` and `gpu_check.md`.

    python benchmarks/gpu_check.py --output-dir outputs/gpu-check [--device cuda] [--skip-tests]

(a) `pytest tests/test_devices.py --device cuda`: every denoiser against its float64 formula on the device, pipelines
    with three schedulers, class labels, save/load across devices.
(b) Per method, B = 64 at 32x32x3 and 64x64x3 (natural-image patches): ms per `denoise` call in float32, with TF32
    matmuls allowed, and with bfloat16 input, and each result's relative difference from float32. Statistics that need
    an eigendecomposition (Wiener, PCA locality) are fitted on the device in float64 (`from_dataset(device=...)`), so
    that the 64x64 fits take seconds, not the CPU's minutes. N per method keeps the whole run short (see `SIZES`).
(c) faiss: whether it imports, how many GPUs it sees, and a top-k call through the GPU index when it has one.
(d) The CLI: `generate --device cuda`, and under `accelerate launch --num_processes 1`.
Every step records what happened (an exception is a row with its message), so one failure does not hide the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from functools import partial

import torch
from timing import best_time

import diffusers_analytic as da

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (method, image size) -> number of stored images, and the config used
SIZES = {
    "wiener": {32: 10000, 64: 10000},
    "optimal": {32: 50000, 64: 10000},
    "scfdm": {32: 10000, 64: 2000},
    "nearest_dataset": {32: 50000, 64: 10000},
    "pca_locality": {32: 10000, 64: 2000},
    "ls": {32: 2000, 64: 500},
    "els": {32: 200, 64: 50},
}
CONFIGS = {"scfdm": {"num_noise": 4}, "ls": {"patch_size_schedule": 5}, "els": {"patch_size_schedule": 5}}
TIMESTEPS = (900, 500, 100)


def fit_on_device(method: str, images: torch.Tensor, device: torch.device):
    """The denoiser of `method` fitted on `images` (uint8 `[N, C, H, W]`); float64 moments and eigh on `device`."""
    cls = da.get_denoiser_class(method)
    if method not in ("wiener", "pca_locality"):
        return cls.from_dataset(images, **CONFIGS.get(method, {}))
    return cls.from_dataset(images, show_progress=False, device=device, **CONFIGS.get(method, {}))


def denoise(denoiser, method: str, sample: torch.Tensor, timestep: int, device: torch.device) -> torch.Tensor:
    """One call; the smoothed CFDM's noise from a fixed generator, so every variant sees the same."""
    kwargs = {"generator": torch.Generator(device).manual_seed(1)} if method == "scfdm" else {}
    return denoiser.denoise(sample, timestep, **kwargs)


def time_methods(device: torch.device, methods: list[str], sizes: list[int]) -> list[dict]:
    rows = []
    for size in sizes:
        largest = max(SIZES[m][size] for m in methods)
        patches = da.load_builtin("patches", size=size, num_images=largest).images
        for method in methods:
            num_images = SIZES[method][size]
            row = {"method": method, "size": size, "num_images": num_images, "batch_size": 64}
            try:
                start = time.perf_counter()
                denoiser = fit_on_device(method, patches[:num_images], device).to(device)
                row["fit_seconds"] = time.perf_counter() - start
                generator = torch.Generator().manual_seed(0)
                x = torch.randn(64, 3, size, size, generator=generator).to(device)
                for timestep in TIMESTEPS:
                    reference = denoise(denoiser, method, x, timestep, device).float()
                    for variant in ("float32", "tf32", "bfloat16"):
                        torch.backends.cuda.matmul.allow_tf32 = variant == "tf32"
                        call = partial(
                            denoise,
                            denoiser,
                            method,
                            x.to(torch.bfloat16) if variant == "bfloat16" else x,
                            timestep,
                            device,
                        )
                        seconds = best_time(call, 1 if method in ("ls", "els", "pca_locality") else 3, device)
                        out = call().float()
                        error = float((out - reference).norm() / reference.norm().clamp(min=1e-30))
                        row[f"t{timestep}_{variant}_ms"] = 1e3 * seconds
                        row[f"t{timestep}_{variant}_error"] = error
                    torch.backends.cuda.matmul.allow_tf32 = False
                if device.type == "cuda":
                    row["peak_memory_gb"] = torch.cuda.max_memory_allocated(device) / 2**30
                    torch.cuda.reset_peak_memory_stats(device)
            except Exception as error:  # noqa: BLE001 - recorded, the run goes on
                row["error"] = f"{type(error).__name__}: {error}"
                row["traceback"] = traceback.format_exc(limit=4)
            print(json.dumps({k: v for k, v in row.items() if k != "traceback"}), flush=True)
            rows.append(row)
            denoiser = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return rows


def check_faiss(device: torch.device) -> dict:
    report = {}
    try:
        import faiss

        report["faiss_version"] = getattr(faiss, "__version__", "?")
        report["num_gpus"] = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    except ImportError as error:
        return {"import_error": str(error)}
    try:
        patches = da.load_builtin("patches", size=32, num_images=20000).images
        denoiser = da.OptimalDenoiser.from_dataset(patches, num_neighbors=200).to(device)
        exact = da.OptimalDenoiser.from_dataset(patches).to(device)
        x = torch.randn(64, 3, 32, 32, generator=torch.Generator().manual_seed(0)).to(device)
        report["topk_ms"] = 1e3 * best_time(lambda: denoiser.denoise(x, 100), 3, device)
        report["exact_ms"] = 1e3 * best_time(lambda: exact.denoise(x, 100), 3, device)
        reference = exact.denoise(x, 100)
        report["topk_error_t100"] = float((denoiser.denoise(x, 100) - reference).norm() / reference.norm())
    except Exception as error:  # noqa: BLE001
        report["error"] = f"{type(error).__name__}: {error}"
    return report


def run_command(command: list[str], timeout: int) -> dict:
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
        return {
            "command": " ".join(command),
            "returncode": done.returncode,
            "seconds": time.perf_counter() - start,
            "tail": (done.stdout + done.stderr)[-3000:],
        }
    except subprocess.TimeoutExpired:
        return {"command": " ".join(command), "returncode": "timeout", "seconds": timeout}


def check_cli(device: torch.device, folder: str) -> list[dict]:
    model = os.path.join(folder, "optimal-digits")
    fit = [sys.executable, "-m", "diffusers_analytic", "fit", "--method", "optimal", "--data", "digits"]
    results = [run_command(fit + ["--output-dir", model, "--overwrite"], 300)]
    generate = ["-m", "diffusers_analytic", "generate", model, "--num-images", "8", "--num-inference-steps", "10"]
    generate += ["--device", str(device)]
    results.append(run_command([sys.executable, *generate, "--output-dir", os.path.join(folder, "plain")], 300))
    accelerate = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", "--num_machines", "1"]
    accelerate += ["--mixed_precision", "no", "--dynamo_backend", "no"]
    results.append(run_command([*accelerate, *generate, "--output-dir", os.path.join(folder, "accelerate")], 300))
    return results


def markdown(report: dict) -> str:
    lines = [f"# GPU check: {report['device_name']}", "", f"torch {report['torch']}, CUDA {report['cuda']}", ""]
    tests = report.get("tests")
    if tests:
        lines += [f"Device tests: return code {tests['returncode']}", "", "```", tests["tail"][-1500:], "```", ""]
    lines += [
        "| method | size | N | fit s | t = 900 / 500 / 100, float32 ms | TF32 ms (max error) | bfloat16 in ms (max error) |",
        "|---|---|---|---|---|---|---|",
    ]
    for row in report["timings"]:
        if "error" in row:
            lines.append(f"| {row['method']} | {row['size']} | {row['num_images']} | - | {row['error'][:80]} | | |")
            continue
        cells = []
        for variant in ("float32", "tf32", "bfloat16"):
            times = " / ".join(f"{row[f't{t}_{variant}_ms']:.1f}" for t in TIMESTEPS)
            worst = max(row[f"t{t}_{variant}_error"] for t in TIMESTEPS)
            cells.append(times if variant == "float32" else f"{times} ({worst:.1e})")
        lines.append(
            f"| {row['method']} | {row['size']} | {row['num_images']} | {row['fit_seconds']:.1f} | "
            + " | ".join(cells)
        )
    lines += ["", f"faiss: `{json.dumps(report['faiss'])}`", ""]
    for result in report.get("cli", []):
        lines.append(f"- `{result['command'][-120:]}`: return code {result['returncode']}, {result['seconds']:.0f} s")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output-dir", default="outputs/gpu-check")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--methods", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--sizes", nargs="+", type=int, default=[32, 64], choices=[32, 64])
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--skip-cli", action="store_true")
    args = parser.parse_args()
    device = torch.device(args.device)
    os.makedirs(args.output_dir, exist_ok=True)
    report = {
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else device.type,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
    }
    if not args.skip_tests:
        test = [sys.executable, "-m", "pytest", "-q", "tests/test_devices.py", "--device", args.device]
        report["tests"] = run_command(test + ["-p", "no:cacheprovider"], 300)
        print(report["tests"]["tail"][-600:], flush=True)
    report["timings"] = time_methods(device, args.methods, args.sizes)
    report["faiss"] = check_faiss(device)
    print(json.dumps(report["faiss"]), flush=True)
    if not args.skip_cli:
        with tempfile.TemporaryDirectory() as folder:
            report["cli"] = check_cli(device, folder)
    with open(os.path.join(args.output_dir, "gpu_check.json"), "w") as f:
        json.dump(report, f, indent=2, default=str)
    with open(os.path.join(args.output_dir, "gpu_check.md"), "w") as f:
        f.write(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
