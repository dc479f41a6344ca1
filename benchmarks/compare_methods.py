"""R^2 of every registered analytic denoiser against one trained UNet, at several timesteps: the table of
`benchmarks/README.md`.

Each method is fitted on the built-in set the UNet was trained on (default digits, with its default config and the
default schedule, which equals `DDPMScheduler()`'s), then [`compare_with_trained`] runs the UNet's DDIM trajectory
and scores each method's x0 prediction on the same x_t (single step) and along its own trajectory.

    python examples/train_unet.py --output-dir outputs/unet-digits
    python benchmarks/compare_methods.py outputs/unet-digits

Prints markdown tables and writes `benchmarks/results/compare-<time>.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from datetime import datetime, timezone

from diffusers import DiffusionPipeline

from diffusers_analytic import load_builtin
from diffusers_analytic.evaluation import compare_with_trained
from diffusers_analytic.registry import DENOISERS

RESULTS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trained", help="the trained DDPMPipeline folder (examples/train_unet.py)")
    parser.add_argument(
        "--data", default="digits", help="built-in set the UNet was trained on (digits, faces, patches)"
    )
    parser.add_argument("--patch-size", type=int, default=16)
    parser.add_argument("--num-patches", type=int, default=5000)
    parser.add_argument("--channels", type=int, default=1)
    parser.add_argument("--methods", nargs="+", default=sorted(DENOISERS), choices=sorted(DENOISERS))
    parser.add_argument("--num-inference-steps", type=int, default=10)
    parser.add_argument("--num-samples", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None)
    return parser.parse_args(argv)


def markdown(
    title: str, timesteps: list[int], rows: dict[str, list[float]], extra: dict[str, float] | None = None
) -> str:
    header = ["method", *[f"t={t}" for t in timesteps]] + (["final sample"] if extra else [])
    lines = [f"**{title}**", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for method, values in rows.items():
        cells = [method, *[f"{v:.3f}" for v in values]] + ([f"{extra[method]:.3f}"] if extra else [])
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> None:
    args = parse_args(argv)
    pipeline = DiffusionPipeline.from_pretrained(args.trained)
    unet, scheduler = pipeline.unet.eval(), pipeline.scheduler
    if args.data == "patches":
        data = load_builtin(
            "patches", size=args.patch_size, num_images=args.num_patches, seed=args.seed, channels=args.channels
        )
    else:
        data = load_builtin(args.data)

    results, timesteps = {}, None
    for method in args.methods:
        start = time.perf_counter()
        denoiser = DENOISERS[method].from_dataset(data, show_progress=False)
        comparison = compare_with_trained(
            denoiser, unet, scheduler, args.num_samples, args.num_inference_steps, args.seed, show_progress=False
        )
        timesteps = comparison.trained.timesteps
        results[method] = {
            "single_step": comparison.single_step.summary(),
            "own_trajectory": comparison.own_trajectory.summary(),
            "final_sample_r2": comparison.final.summary()["r2_mean"][0],
            "seconds": time.perf_counter() - start,
        }
        print(f"  {method}: {results[method]['seconds']:.1f} s", file=sys.stderr, flush=True)

    print(
        markdown(
            "Single step (same x_t), mean R^2", timesteps, {m: r["single_step"]["r2_mean"] for m, r in results.items()}
        )
    )
    print()
    print(
        markdown(
            "Own trajectories from the same x_T, mean R^2 of x0",
            timesteps,
            {m: r["own_trajectory"]["r2_mean"] for m, r in results.items()},
            {m: r["final_sample_r2"] for m, r in results.items()},
        )
    )
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S")
    output = args.output or os.path.join(RESULTS_DIR, f"compare-{stamp}.json")
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    settings = {k: v for k, v in vars(args).items() if k != "output"}
    with open(output, "w") as f:
        json.dump({"settings": settings, "timesteps": timesteps, "results": results}, f, indent=2)
    print(f"Wrote {output}", file=sys.stderr)


if __name__ == "__main__":
    main()
