"""`diffusers-analytic compare ANALYTIC TRAINED`: how close is an analytic denoiser to a trained diffusion network?

Runs the trained pipeline's DDIM trajectory from the noise of `(seed, i)` and, at every step, scores the analytic
denoiser's x0_hat on the same x_t (single step) and along its own trajectory from the same x_T against the trained
network's x0_hat: R^2 = 1 - SS_res / (Var(trained) * D) per sample, averaged, and MSE. Writes `metrics.json`,
`r2_per_step.png` (needs matplotlib; skipped with a warning without it) and comparison grids:

- `grid_single_step.png`: per sample, a row of the trained x0_hat and below it the analytic x0_hat on the same x_t,
  one column per (selected) step from noisy to clean;
- `grid_own_trajectory.png`: the same along each model's own trajectory;
- `grid_final.png`: the trained model's final samples (top row) above the analytic ones (bottom row).
"""

from __future__ import annotations

import logging
import math
import os

logger = logging.getLogger(__name__)  # (the logger `diffusers.utils.logging.get_logger` gives, without the import)


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "compare",
        help="compare an analytic pipeline with a trained diffusers pipeline (per-step R^2 / MSE)",
        description=(
            "Compare an analytic denoiser with a trained network on the trained network's DDIM trajectory: per-step "
            "R^2 and MSE of x0 predictions (same x_t and own trajectories), a plot and image grids."
        ),
    )
    parser.add_argument("analytic", metavar="ANALYTIC", help="an analytic pipeline folder or Hub repo id")
    parser.add_argument(
        "trained",
        metavar="TRAINED",
        help="a trained diffusers pipeline folder or Hub repo id with `unet` and `scheduler` (e.g. a DDPMPipeline)",
    )
    parser.add_argument("--output-dir", required=True, help="where metrics.json, r2_per_step.png and the grids go")
    parser.add_argument("--num-inference-steps", type=int, default=50, help="DDIM steps")
    parser.add_argument("--num-samples", type=int, default=64, help="trajectories compared")
    parser.add_argument("--seed", type=int, default=0, help="sample i starts from the noise of (seed, i)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta (0 = deterministic)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    parser.add_argument("--grid-samples", type=int, default=8, help="samples shown in the grids")
    parser.add_argument("--grid-steps", type=int, default=10, help="at most this many steps shown in the grids")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")


def run(args) -> None:
    from ..evaluation import compare_with_trained, load_trained
    from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline
    from ..saving import write_json
    from .common import resolve_device

    if min(args.num_inference_steps, args.num_samples, args.batch_size, args.grid_samples, args.grid_steps) < 1:
        raise ValueError(
            "--num-inference-steps, --num-samples, --batch-size, --grid-samples and --grid-steps must be positive."
        )
    device = resolve_device(args.device)
    denoiser = AnalyticDDIMPipeline.from_pretrained(args.analytic).unet.to(device)
    unet, scheduler = load_trained(args.trained)
    unet.to(device).eval()

    comparison = compare_with_trained(
        denoiser,
        unet,
        scheduler,
        num_samples=args.num_samples,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        eta=args.eta,
        batch_size=args.batch_size,
        device=device,
    )
    os.makedirs(args.output_dir, exist_ok=True)
    metrics = {"analytic": args.analytic, "trained": args.trained, **comparison.to_dict()}
    write_json(metrics, os.path.join(args.output_dir, "metrics.json"))
    try:
        plot_per_step(metrics, os.path.join(args.output_dir, "r2_per_step.png"))
    except ImportError as error:  # the numbers and grids do not need matplotlib
        logger.warning(f"Skipped r2_per_step.png: {error}")
    write_grids(comparison, args.output_dir, args.grid_samples, args.grid_steps)

    single, own = metrics["single_step"], metrics["own_trajectory"]
    logger.info(
        f"R^2 (single step) from {single['r2_mean'][0]:.3f} at t={single['timesteps'][0]} to "
        f"{single['r2_mean'][-1]:.3f} at t={single['timesteps'][-1]}; own trajectory final R^2 "
        f"{metrics['final_sample']['r2_mean']:.3f}. Wrote {args.output_dir}/metrics.json"
    )
    logger.info(f"Own-trajectory R^2 per step: {[round(v, 3) for v in own['r2_mean']]}")


def plot_per_step(metrics: dict, path: str) -> None:
    """Per-step R^2 (left) and MSE (right, log scale) of both comparisons against the timestep, saved as a PNG."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no global backend or figure state
    except ImportError as error:
        raise ImportError("The per-step plot needs matplotlib: `pip install matplotlib`.") from error

    figure = Figure(figsize=(10, 3.8))
    ax_r2, ax_mse = figure.subplots(1, 2)
    for key, label in (("single_step", "same x_t (single step)"), ("own_trajectory", "own trajectories")):
        scores = metrics[key]
        t = scores["timesteps"]
        ax_r2.plot(t, scores["r2_mean"], marker="o", markersize=3, label=label)
        ax_mse.plot(t, scores["mse_mean"], marker="o", markersize=3, label=label)
    for ax, name in ((ax_r2, "R$^2$ vs trained x0"), (ax_mse, "MSE vs trained x0")):
        ax.set_xlabel("timestep t")
        ax.set_ylabel(name)
        ax.invert_xaxis()  # sampling runs from t = T to 0
        ax.grid(alpha=0.3)
        ax.legend()
    ax_r2.set_ylim(max(-1.0, min(min(metrics[k]["r2_mean"]) for k in ("single_step", "own_trajectory")) - 0.05), 1.02)
    ax_mse.set_yscale("log")
    figure.suptitle(f"{metrics['denoiser']} vs {metrics['trained_model']} ({metrics['num_samples']} samples)")
    figure.tight_layout()
    temporary = f"{path}.tmp-{os.getpid()}.png"
    figure.savefig(temporary, dpi=120)
    os.replace(temporary, path)


def _to_pil(images, upscale: int):
    """Model-space `[n, C, H, W]` -> PIL images, clamped to [-1, 1] and enlarged by `upscale` (nearest)."""
    import torch
    from PIL import Image

    array = ((images.cpu().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    out = []
    for image in array:
        pil = Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)
        out.append(pil.resize((pil.width * upscale, pil.height * upscale), Image.Resampling.NEAREST))
    return out


def write_grids(comparison, output_dir: str, grid_samples: int, grid_steps: int) -> None:
    """The three comparison grids of the module docstring (`comparison`: an `evaluation.Comparison`), each written to
    a temporary file and renamed."""
    import torch
    from diffusers.utils import make_image_grid

    trained, analytic = comparison.trained, comparison.analytic
    num_steps, num_samples = trained.x0.shape[:2]
    samples = min(grid_samples, num_samples)
    steps = sorted(
        {
            round(i * (num_steps - 1) / max(1, min(grid_steps, num_steps) - 1))
            for i in range(min(grid_steps, num_steps))
        }
    )
    height = trained.x0.shape[-2]
    upscale = max(1, math.ceil(64 / height))

    def save(grid, name):
        path = os.path.join(output_dir, name)
        temporary = f"{path}.tmp-{os.getpid()}.png"
        grid.save(temporary, format="PNG")
        os.replace(temporary, path)

    for name, analytic_x0 in (
        ("grid_single_step.png", comparison.single_step.x0),
        ("grid_own_trajectory.png", analytic.x0),
    ):
        rows = []
        for i in range(samples):
            rows.append(trained.x0[steps, i])  # [steps, C, H, W]
            rows.append(analytic_x0[steps, i])
        images = _to_pil(torch.cat(rows), upscale)
        save(make_image_grid(images, rows=2 * samples, cols=len(steps)), name)
    finals = _to_pil(torch.cat([trained.final[:samples], analytic.final[:samples]]), upscale)
    save(make_image_grid(finals, rows=2, cols=samples), "grid_final.png")
