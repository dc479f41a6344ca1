"""The patch-size schedule of an LS / ELS machine fitted to a trained network (Kamb & Ganguli, arXiv 2412.20292).

At every step of the trained network's DDIM trajectory from the noise of `(seed, i)` ([`trained_trajectory`]), the
machine's x0_hat with each candidate patch size k on the trajectory's own x_t is scored against the trained x0_hat
(per-sample R^2, [`r2_score`]). The k with the highest median R^2 over samples wins the step; the winners become
log-SNR breakpoints halfway between neighbouring steps (`schedule_from_steps`), to be written into the machine's
`patch_size_schedule`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from tqdm.auto import tqdm

from ..models.patch_schedule import schedule_from_steps
from .comparison import check_same_schedule, check_same_shape, evaluate_on_trajectory
from .trajectories import trained_trajectory


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
        schedule (`list[list[float]]`): the `[[log_snr, k], ...]` breakpoints for the config.
    """

    timesteps: list[int]
    log_snrs: list[float]
    candidates: list[int]
    median_r2: dict[int, list[float]]
    patch_sizes: list[int]
    schedule: list[list[float]]

    def to_dict(self) -> dict:
        """The table for JSON (candidate sizes as string keys)."""
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
        num_samples, num_inference_steps, seed, batch_size, device, show_progress: as in [`trained_trajectory`].

    Returns:
        [`Calibration`]; the machine itself is not changed (apply `calibration.schedule` with
        `machine.set_patch_size_schedule`).
    """
    if not hasattr(machine, "denoise_with_patch_size"):
        raise ValueError(
            f"calibrate needs an LS or ELS machine (a patch-size schedule), got a {type(machine).__name__}."
        )
    if not candidates:
        raise ValueError("`candidates` must hold at least one patch size.")
    check_same_schedule(machine, scheduler)
    check_same_shape(machine, unet)
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
