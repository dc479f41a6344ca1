"""An analytic denoiser against a trained network: x0 predictions on the trained trajectory and along its own.

Single-step comparison: at every step of the trained network's trajectory, the x0_hat that the analytic denoiser
predicts on the *same* x_t against the trained network's x0_hat. Own-trajectory comparison: the two models' x0_hat
along their *own* trajectories from the same noise. Both are scored with R^2 and MSE per sample (see `scores`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from tqdm.auto import tqdm

from ..pipelines.pipeline_analytic_ddim import schedule_mismatch
from ..utils.seeding import generators_for_indices
from .scores import StepScores, score_steps
from .trajectories import Trajectory, analytic_trajectory, ddim_scheduler_like, trained_trajectory, unet_sample_shape


def check_same_schedule(denoiser, scheduler) -> None:
    """Raises a ValueError when the trained `scheduler`'s noise schedule is not the denoiser's."""
    problem = schedule_mismatch(denoiser, scheduler)
    if problem is not None:
        raise ValueError(
            "The analytic denoiser and the trained model must share one noise schedule to be compared on the same "
            f"x_t. {problem} Refit the analytic denoiser with the trained model's schedule "
            "(`from_dataset(..., beta_schedule=..., beta_start=..., beta_end=...)`)."
        )


def check_same_shape(denoiser, unet) -> None:
    """Raises a ValueError when the trained network's samples (`in_channels`, `sample_size`) are not the denoiser's."""
    shape = unet_sample_shape(unet)
    if tuple(shape) != tuple(denoiser.sample_shape):
        raise ValueError(
            f"The trained network makes samples of shape {list(shape)} (in_channels, sample_size) but the analytic "
            f"denoiser's are {list(denoiser.sample_shape)}."
        )


@torch.no_grad()
def evaluate_on_trajectory(
    denoiser,
    trajectory: Trajectory,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> StepScores:
    r"""
    Single-step comparison: at every step of `trajectory`, the x0_hat that `denoiser` predicts on the trajectory's own
    x_t, scored against the trajectory's x0_hat (R^2 and MSE per sample).

    Args:
        denoiser: an analytic denoiser (anything with `denoise(sample, timestep, generator=)`), or a callable
            `(x_t [B, C, H, W], timestep) -> x0_hat`.
        trajectory ([`Trajectory`]): e.g. from [`trained_trajectory`].
        batch_size (`int`, defaults to 64): samples per call.
        device: where `denoiser` runs; x_t is moved there, x0_hat back to the CPU.
        show_progress (`bool`, defaults to `True`): a tqdm bar over steps.

    Returns:
        [`StepScores`] with the predictions in `x0`. Sample i's randomness (methods that draw noise) comes from the
        generator of `(trajectory.seed, i)`, so scores do not depend on `batch_size`.
    """
    if hasattr(denoiser, "denoise"):

        def predict(x_t, t, generators):
            return denoiser.denoise(x_t, t, generator=generators)

    elif callable(denoiser):

        def predict(x_t, t, generators):
            return denoiser(x_t, t)

    else:
        raise ValueError(f"`denoiser` must have a `denoise` method or be callable, got a {type(denoiser).__name__}.")
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    num_samples = trajectory.xt.shape[1]
    batches = [list(range(s, min(s + batch_size, num_samples))) for s in range(0, num_samples, batch_size)]
    generators = {tuple(b): generators_for_indices(trajectory.seed, b) for b in batches}
    predictions = torch.empty_like(trajectory.x0)
    for step, t in enumerate(tqdm(trajectory.timesteps, desc="Single-step", unit="step", disable=not show_progress)):
        for batch in batches:
            x_t = trajectory.xt[step, batch[0] : batch[-1] + 1].to(device)
            predictions[step, batch[0] : batch[-1] + 1] = predict(x_t, t, generators[tuple(batch)]).float().cpu()
    return score_steps(predictions, trajectory.x0, trajectory.timesteps)


@dataclass
class Comparison:
    """
    Result of [`compare_with_trained`].

    Args:
        trained ([`Trajectory`]): the trained network's DDIM trajectory.
        analytic ([`Trajectory`]): the analytic denoiser's own trajectory from the same x_T.
        single_step ([`StepScores`]): the analytic x0_hat on the trained trajectory's x_t vs the trained x0_hat.
        own_trajectory ([`StepScores`]): the analytic x0_hat along its own trajectory vs the trained one at each step.
        final ([`StepScores`]): the final samples of the two trajectories (one "step", timestep -1).
        settings (`dict`): the run's settings, written first by [`~Comparison.to_dict`].
    """

    trained: Trajectory
    analytic: Trajectory
    single_step: StepScores
    own_trajectory: StepScores
    final: StepScores
    settings: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Everything but the tensors, for JSON."""
        return {
            **self.settings,
            "timesteps": list(self.trained.timesteps),
            "single_step": self.single_step.summary(),
            "own_trajectory": self.own_trajectory.summary(),
            "final_sample": {k: v[0] for k, v in self.final.summary().items() if k != "timesteps"},
        }


@torch.no_grad()
def compare_with_trained(
    denoiser,
    unet,
    scheduler,
    num_samples: int = 64,
    num_inference_steps: int = 50,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> Comparison:
    r"""
    Compares an analytic denoiser with a trained network, the reference's R^2 / MSE evaluation:

    1. the trained network's DDIM trajectory from the noise of `(seed, i)` ([`trained_trajectory`]);
    2. single step: the analytic x0_hat on the same x_t at every step, scored against the trained x0_hat;
    3. own trajectory: the analytic denoiser's DDIM trajectory from the same x_T ([`analytic_trajectory`], the same
       scheduler config with the denoiser's prediction type), its x0_hat at every step scored against the trained
       one, and the final samples.

    Args:
        denoiser: an analytic denoiser ([`AnalyticDenoiserMixin`]); it runs on `device` (it is moved there).
        unet, scheduler: the trained pipeline's network and scheduler; the scheduler's `alphas_cumprod` must equal the
            denoiser's (else a ValueError), and the network's `in_channels` / `sample_size` the denoiser's.
        num_samples, num_inference_steps, seed, eta, batch_size, device, show_progress: as in [`trained_trajectory`].
    """
    check_same_schedule(denoiser, scheduler)
    check_same_shape(denoiser, unet)
    # 1. The trained trajectory, and 2. the analytic x0_hat on its x_t.
    trained = trained_trajectory(
        unet, scheduler, num_samples, num_inference_steps, seed, eta, batch_size, device, show_progress
    )
    single_step = evaluate_on_trajectory(denoiser, trained, batch_size, device, show_progress)

    # 3. The analytic denoiser's own trajectory from the same x_T, with the same DDIM settings.
    analytic_scheduler = ddim_scheduler_like(scheduler, prediction_type=denoiser.config.prediction_type)
    analytic = analytic_trajectory(
        denoiser, analytic_scheduler, num_samples, num_inference_steps, seed, eta, batch_size, device, show_progress
    )
    own_trajectory = score_steps(analytic.x0, trained.x0, trained.timesteps, keep=False)
    final = score_steps(analytic.final[None], trained.final[None], [-1], keep=False)
    settings = {
        "num_samples": num_samples,
        "num_inference_steps": num_inference_steps,
        "seed": seed,
        "eta": eta,
        "scheduler": "DDIMScheduler",
        "trained_prediction_type": scheduler.config.prediction_type,
        "analytic_prediction_type": denoiser.config.prediction_type,
        "denoiser": type(denoiser).__name__,
        "trained_model": type(unet).__name__,
    }
    return Comparison(trained, analytic, single_step, own_trajectory, final, settings)
