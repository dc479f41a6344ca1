"""`diffusers-analytic calibrate MACHINE TRAINED`: fit the patch-size schedule of an LS / ELS machine to a trained model.

Kamb & Ganguli (arXiv 2412.20292) choose, at every step of a reverse process, the patch size k whose machine best
predicts the trained network. This command does the same: it runs the trained pipeline's DDIM trajectory from the
noise of `(seed, i)` (the comparison tool's `trained_trajectory`), and at every step scores the machine's x0_hat with
each candidate k on the trajectory's own x_t against the trained x0_hat (per-sample R^2, the comparison tool's
`r2_score`). The k with the highest median R^2 over samples wins the step; the winners become log-SNR breakpoints
(halfway between neighbouring steps), written into the machine's `patch_size_schedule`, and the pipeline is saved to
`--output-dir` atomically, with `calibration.json` (the R^2 table) beside the weights.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

logger = logging.get_logger(__name__)

DEFAULT_CANDIDATES = "1,3,5,7,9,11,13,15,17,19,21,23,25,27"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "calibrate",
        help="calibrate the patch-size schedule of an LS / ELS pipeline against a trained pipeline",
        description=(
            "Choose the patch size of an LS / ELS machine at every step of the trained pipeline's DDIM trajectory (the "
            "one maximising the median R^2 of x0 predictions) and save the machine with that schedule."
        ),
    )
    parser.add_argument("machine", metavar="MACHINE", help="an LS or ELS pipeline folder or Hub repo id")
    parser.add_argument(
        "trained",
        metavar="TRAINED",
        help="a trained diffusers pipeline folder or Hub repo id with `unet` and `scheduler` (an analytic one works too)",
    )
    parser.add_argument("--output-dir", required=True, help="the calibrated pipeline folder to write")
    parser.add_argument("--candidates", default=DEFAULT_CANDIDATES, help="odd patch sizes to try, comma separated")
    parser.add_argument("--num-samples", type=int, default=8, help="trajectories scored (the median is over these)")
    parser.add_argument("--num-inference-steps", type=int, default=20, help="DDIM steps of the trained trajectory")
    parser.add_argument("--seed", type=int, default=0, help="sample i starts from the noise of (seed, i)")
    parser.add_argument("--batch-size", type=int, default=64, help="samples per forward pass")
    parser.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available, else cpu)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output folder")


def parse_candidates(text: str) -> list[int]:
    """`"3,5,7"` -> `[3, 5, 7]`; every entry an odd positive integer, else a ValueError naming it."""
    sizes = []
    for item in text.split(","):
        item = item.strip()
        if not item.isdigit() or int(item) % 2 == 0 or int(item) < 1:
            raise ValueError(
                f"--candidates must be odd positive integers separated by commas, got {item!r} in {text!r}."
            )
        sizes.append(int(item))
    return sorted(set(sizes))


@dataclass
class Calibration:
    """
    Result of [`calibrate_patch_sizes`].

    Args:
        timesteps (`list[int]`): the trajectory's timesteps, `[S]`, noisiest first.
        log_snrs (`list[float]`): log-SNR of each step.
        candidates (`list[int]`): the patch sizes tried (after capping to what the machine can use).
        median_r2 (`dict[int, list[float]]`): per candidate, the median R^2 over samples at each step.
        patch_sizes (`list[int]`): the chosen k per step.
        schedule (`list[list[float]]`): the `[[log_snr, k], ...]` breakpoints written to the config.
    """

    timesteps: list[int]
    log_snrs: list[float]
    candidates: list[int]
    median_r2: dict[int, list[float]]
    patch_sizes: list[int]
    schedule: list[list[float]]

    def to_dict(self) -> dict:
        return {
            "timesteps": self.timesteps,
            "log_snr": self.log_snrs,
            "candidates": self.candidates,
            "median_r2": {str(k): v for k, v in self.median_r2.items()},
            "patch_sizes": self.patch_sizes,
            "patch_size_schedule": self.schedule,
        }


@torch.no_grad()
def calibrate_patch_sizes(
    machine,
    unet,
    scheduler,
    candidates: list[int],
    num_samples: int = 8,
    num_inference_steps: int = 20,
    seed: int = 0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> Calibration:
    r"""
    For each step of the trained model's DDIM trajectory, the candidate patch size k that maximises the median over
    samples of R^2(machine x0_hat with k, trained x0_hat) on the trajectory's x_t; ties go to the smaller k.

    Args:
        machine: an LS / ELS denoiser ([`LocalScoreDenoiser`] or [`EquivariantLocalScoreDenoiser`]).
        unet, scheduler: the trained pipeline's network and scheduler (any DDPM-type schedule equal to the machine's).
        candidates (`list[int]`): odd patch sizes to try. Sizes the machine caps to the same size are tried once.
        num_samples, num_inference_steps, seed, batch_size, device, show_progress: as in
            [`~diffusers_analytic.evaluation.trained_trajectory`].

    Returns:
        [`Calibration`]; the machine itself is not changed (apply `calibration.schedule` with
        `machine.set_patch_size_schedule`).
    """
    from ..evaluation import check_same_schedule, evaluate_on_trajectory, trained_trajectory, unet_sample_shape
    from ..models.patch_schedule import schedule_from_steps

    if not hasattr(machine, "denoise_with_patch_size"):
        raise ValueError(
            f"calibrate needs an LS or ELS machine (a patch-size schedule), got a {type(machine).__name__}."
        )
    if not candidates:
        raise ValueError("`candidates` must hold at least one patch size.")
    check_same_schedule(machine, scheduler)
    if tuple(unet_sample_shape(unet)) != tuple(machine.sample_shape):
        raise ValueError(
            f"The trained network makes samples of shape {list(unet_sample_shape(unet))} but the machine's are "
            f"{list(machine.sample_shape)}."
        )
    # 1. The trained model's own trajectory: x_t and its x0_hat at every step.
    trajectory = trained_trajectory(
        unet,
        scheduler,
        num_samples,
        num_inference_steps,
        seed,
        batch_size=batch_size,
        device=device,
        show_progress=show_progress,
    )
    # 2. Each (distinct, after capping) candidate's x0_hat on the same x_t, scored by R^2 per sample.
    effective = sorted({machine.effective_patch_size(k) for k in candidates})
    median_r2 = {}
    for k in tqdm(effective, desc="Patch sizes", unit="size", disable=not show_progress):
        scores = evaluate_on_trajectory(
            lambda x_t, t, k=k: machine.denoise_with_patch_size(x_t, t, k),
            trajectory,
            batch_size,
            device,
            show_progress=False,
        )
        median_r2[k] = torch.nanmedian(scores.r2, dim=1).values.tolist()  # [S]
    # 3. The best k per step (first maximum: the smaller k on ties; NaN never wins).
    chosen = []
    for step in range(len(trajectory.timesteps)):
        values = [(median_r2[k][step], k) for k in effective]
        finite = [(value, k) for value, k in values if not math.isnan(value)]
        chosen.append(max(finite, key=lambda item: (item[0], -item[1]))[1] if finite else effective[0])
    alpha_prod, beta_prod = machine.alpha_prod_at(torch.tensor(trajectory.timesteps, dtype=torch.float64))
    log_snrs = (alpha_prod.log() - beta_prod.log()).tolist()
    return Calibration(
        timesteps=list(trajectory.timesteps),
        log_snrs=log_snrs,
        candidates=effective,
        median_r2=median_r2,
        patch_sizes=chosen,
        schedule=schedule_from_steps(log_snrs, chosen),
    )


def run(args) -> None:
    from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline
    from .compare import load_trained, write_json
    from .fit import save_atomically

    if min(args.num_inference_steps, args.num_samples, args.batch_size) < 1:
        raise ValueError("--num-inference-steps, --num-samples and --batch-size must be positive.")
    candidates = parse_candidates(args.candidates)
    output_dir = os.path.abspath(args.output_dir)
    if os.path.exists(output_dir) and not args.overwrite:
        raise ValueError(f"{output_dir} exists; pass --overwrite to replace it.")
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    pipeline = AnalyticDDIMPipeline.from_pretrained(args.machine)
    machine = pipeline.unet.to(device)
    unet, scheduler = load_trained(args.trained)
    unet.to(device).eval()

    calibration = calibrate_patch_sizes(
        machine,
        unet,
        scheduler,
        candidates,
        num_samples=args.num_samples,
        num_inference_steps=args.num_inference_steps,
        seed=args.seed,
        batch_size=args.batch_size,
        device=device,
    )
    machine.set_patch_size_schedule(calibration.schedule)
    save_atomically(pipeline.to("cpu"), output_dir, overwrite=args.overwrite)
    write_json(
        {
            "machine": args.machine,
            "trained": args.trained,
            "num_samples": args.num_samples,
            "seed": args.seed,
            **calibration.to_dict(),
        },
        os.path.join(output_dir, "calibration.json"),
    )
    table = ", ".join(f"t={t}: k={k}" for t, k in zip(calibration.timesteps, calibration.patch_sizes))
    logger.info(f"Calibrated patch sizes ({table}); saved the machine to {output_dir}")
    logger.info(json.dumps(calibration.schedule))
