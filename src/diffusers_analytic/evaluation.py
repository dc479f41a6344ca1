"""How close is a denoiser to a trained diffusion network? R^2 and MSE of x0 predictions along a trajectory.

The reference's main evaluation: run a trained network's sampling trajectory, and at every step compare the clean
image x0_hat that another denoiser predicts on the *same* noisy sample x_t with the trained network's x0_hat
(single-step comparison), or compare the two models' x0_hat along their *own* trajectories started from the same
noise. Per sample, with the trained prediction as target (D = C * H * W values)::

    MSE = 1/D * sum_d (pred_d - target_d)^2
    R^2 = 1 - sum_d (pred_d - target_d)^2 / (Var(target) * D),   Var(target) = 1/D * sum_d (target_d - mean(target))^2

then averaged over samples. The building blocks are separate so that other tools (a patch-size calibration, say)
can run a trained trajectory once with [`trained_trajectory`] and score many candidate denoisers on it with
[`evaluate_on_trajectory`].
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from diffusers import DDIMScheduler
from diffusers.utils import logging
from tqdm.auto import tqdm

from .pipelines.pipeline_analytic_ddim import schedule_mismatch
from .utils.seeding import generators_for_indices

logger = logging.get_logger(__name__)

# x0 from an epsilon prediction divides by sqrt(a); a schedule with zero terminal SNR has a = 0 at its last step.
_MIN_ALPHA_PROD = 1e-20


# ---------------------------------------------------------------------------------------------- metrics
def _flatten_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must have the same shape, got {list(pred.shape)} and {list(target.shape)}."
        )
    if pred.ndim < 2:
        raise ValueError(
            f"`pred` and `target` must be batches [B, ...] of at least 2 dimensions, got {list(pred.shape)}."
        )
    return pred.reshape(len(pred), -1).double(), target.reshape(len(target), -1).double()


def mse_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""
    Mean squared error per sample, `1/D * sum_d (pred_d - target_d)^2`.

    Args:
        pred (`torch.Tensor` of shape `(B, ...)`): the prediction (e.g. an analytic denoiser's x0_hat).
        target (`torch.Tensor` of the same shape): the reference (e.g. the trained network's x0_hat).

    Returns:
        `torch.Tensor`: float64 `[B]`, on the inputs' device.
    """
    pred, target = _flatten_pair(pred, target)
    return (pred - target).pow(2).mean(dim=1)


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""
    Coefficient of determination per sample, `1 - SS_res / (Var(target) * D)` with `SS_res = sum_d (pred_d -
    target_d)^2` and `Var(target)` the (population, 1/D) variance of that sample's D target values. 1 means equal,
    0 means no better than the target's own mean, and it is negative for worse. A sample whose target is constant
    has R^2 = 1 if `pred` equals it and NaN otherwise (0/0 is not a score).

    Args:
        pred (`torch.Tensor` of shape `(B, ...)`): the prediction.
        target (`torch.Tensor` of the same shape): the reference whose variance normalises the error.

    Returns:
        `torch.Tensor`: float64 `[B]`, on the inputs' device.
    """
    pred, target = _flatten_pair(pred, target)
    ss_res = (pred - target).pow(2).sum(dim=1)  # [B]
    ss_tot = (target - target.mean(dim=1, keepdim=True)).pow(2).sum(dim=1)  # Var(target) * D   [B]
    r2 = 1.0 - ss_res / ss_tot.where(ss_tot > 0, torch.ones_like(ss_tot))
    constant = ss_tot == 0
    return torch.where(constant, torch.where(ss_res == 0, 1.0, float("nan")).to(r2), r2)


# ---------------------------------------------------------------------------------------------- x0 of a trained net
def x0_from_model_output(
    model_output: torch.Tensor,
    sample: torch.Tensor,
    alpha_prod_t: torch.Tensor | float,
    prediction_type: str = "epsilon",
) -> torch.Tensor:
    r"""
    The clean-image estimate implied by a network's output (as diffusers' schedulers compute it in `step`):

        epsilon:       x0_hat = (x_t - sqrt(1 - a) eps_hat) / sqrt(a)
        v_prediction:  x0_hat = sqrt(a) x_t - sqrt(1 - a) v_hat
        sample:        x0_hat = the output

    Args:
        model_output (`torch.Tensor` of shape `(B, C, H, W)`): the network's prediction. An output with 2C channels
            (a learned variance) must be split by the caller.
        sample (`torch.Tensor` of the same shape): x_t.
        alpha_prod_t (`torch.Tensor` or `float`): a = alphas_cumprod[t], a number or a `[B]` tensor.
        prediction_type (`str`): `"epsilon"`, `"v_prediction"` or `"sample"`, the scheduler config's.
    """
    if prediction_type == "sample":
        return model_output
    a = torch.as_tensor(alpha_prod_t, dtype=torch.float64, device=sample.device).reshape(-1, 1, 1, 1)
    sqrt_a, sqrt_one_minus_a = a.sqrt(), (1.0 - a).clamp(min=0).sqrt()
    x_t, output = sample.double(), model_output.double()
    if prediction_type == "epsilon":
        x0 = (x_t - sqrt_one_minus_a * output) / sqrt_a.clamp(min=_MIN_ALPHA_PROD**0.5)
    elif prediction_type == "v_prediction":
        x0 = sqrt_a * x_t - sqrt_one_minus_a * output
    else:
        raise ValueError(f"`prediction_type` must be 'epsilon', 'v_prediction' or 'sample', got {prediction_type!r}.")
    return x0.to(sample.dtype)


# A predictor maps (x_t [B, C, H, W], timestep, generators) -> (what the scheduler steps with, x0_hat).
Predictor = Callable[[torch.Tensor, torch.Tensor, list], tuple[torch.Tensor, torch.Tensor]]


def unet_predictor(unet, scheduler) -> Predictor:
    """A [`Predictor`] of a trained `UNet2DModel` (or any model called as `unet(x_t, t).sample`) with its scheduler."""
    alphas_cumprod = torch.as_tensor(scheduler.alphas_cumprod).detach().to("cpu", torch.float64)
    prediction_type = scheduler.config.prediction_type
    channels = int(unet.config.in_channels) if hasattr(unet, "config") else None

    def predict(x_t, timestep, generators):
        output = unet(x_t, timestep).sample
        if channels is not None and output.shape[1] == 2 * channels:  # a learned variance rides along: drop it
            output = output[:, :channels]
        a = alphas_cumprod[int(timestep)]
        return output, x0_from_model_output(output, x_t, a, prediction_type)

    return predict


def denoiser_predictor(denoiser) -> Predictor:
    """A [`Predictor`] of an analytic denoiser: its `forward` gives the prediction and x0_hat at once."""

    def predict(x_t, timestep, generators):
        output = denoiser(x_t, timestep, generator=generators)
        return output.sample, output.pred_original_sample

    return predict


# ---------------------------------------------------------------------------------------------- trajectories
@dataclass
class Trajectory:
    """
    A sampling trajectory of `N` samples over `S` steps (all on the CPU).

    Args:
        timesteps (`list[int]`): the scheduler's timestep at each step, `[S]`.
        xt (`torch.Tensor`): the model input x_t at each step, `[S, N, C, H, W]`.
        x0 (`torch.Tensor`): the model's x0_hat at each step, `[S, N, C, H, W]`.
        final (`torch.Tensor`): the final sample, `[N, C, H, W]` (model space, unclamped).
        seed (`int`): the run's seed; sample i's noise and randomness come from `(seed, i)`.
    """

    timesteps: list[int]
    xt: torch.Tensor
    x0: torch.Tensor
    final: torch.Tensor
    seed: int = 0


def initial_noise(shape: tuple[int, int, int], indices, seed: int) -> tuple[torch.Tensor, list[torch.Generator]]:
    """
    x_T for the given sample indices, `[n, C, H, W]` float32 on the CPU, drawn from one generator per index seeded
    from `(seed, index)` as `diffusers-analytic generate` does; the generators, advanced past the draw, are returned
    for the scheduler's and the denoiser's later randomness.
    """
    generators = generators_for_indices(seed, indices)
    noise = torch.stack([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])
    return noise, generators


def ddim_scheduler_like(scheduler, **overrides) -> DDIMScheduler:
    """A `DDIMScheduler` with `scheduler`'s training schedule and prediction type (as diffusers' `DDIMPipeline` builds)."""
    accepted = set(inspect.signature(DDIMScheduler.__init__).parameters)
    config = {k: v for k, v in dict(scheduler.config).items() if k in accepted}
    return DDIMScheduler(**{**config, **overrides})


@torch.no_grad()
def sample_trajectory(
    predictor: Predictor,
    scheduler,
    sample_shape: tuple[int, int, int],
    num_samples: int,
    num_inference_steps: int = 50,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> Trajectory:
    r"""
    Runs a sampling loop with `predictor` and `scheduler` and records x_t and x0_hat at every step. Sample i starts
    from the noise of `(seed, i)` (see [`initial_noise`]), so two models run with the same seed start from the same
    x_T whatever the batch size.

    Args:
        predictor ([`Predictor`]): from [`unet_predictor`] or [`denoiser_predictor`].
        scheduler: a diffusers scheduler (its `set_timesteps` is called per batch).
        sample_shape (`(C, H, W)`): shape of one sample.
        num_samples (`int`): N.
        num_inference_steps (`int`, defaults to 50): S.
        seed (`int`, defaults to 0): the run's seed.
        eta (`float`, defaults to 0.0): DDIM's eta, for schedulers that take it.
        batch_size (`int`, defaults to 64): samples per forward pass.
        device: where the models run.
        show_progress (`bool`, defaults to `True`): a tqdm bar over batches.
    """
    if num_samples < 1 or num_inference_steps < 1 or batch_size < 1:
        raise ValueError(
            f"`num_samples`, `num_inference_steps` and `batch_size` must be positive, got {num_samples}, "
            f"{num_inference_steps} and {batch_size}."
        )
    step_parameters = set(inspect.signature(scheduler.step).parameters)
    xt_steps, x0_steps, finals, timesteps = [], [], [], []
    starts = range(0, num_samples, batch_size)
    for start in tqdm(starts, desc="Trajectory", unit="batch", disable=not show_progress):
        indices = list(range(start, min(start + batch_size, num_samples)))
        noise, generators = initial_noise(sample_shape, indices, seed)
        latents = noise.to(device) * scheduler.init_noise_sigma
        scheduler.set_timesteps(num_inference_steps, device=device)
        extra = {}
        if "eta" in step_parameters:
            extra["eta"] = eta
        if "generator" in step_parameters:
            extra["generator"] = generators
        batch_xt, batch_x0, timesteps = [], [], []
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(latents, t)
            model_output, x0_hat = predictor(model_input, t, generators)
            batch_xt.append(model_input.float().cpu())
            batch_x0.append(x0_hat.float().cpu())
            timesteps.append(int(t))
            latents = scheduler.step(model_output, t, latents, **extra).prev_sample
        xt_steps.append(torch.stack(batch_xt))
        x0_steps.append(torch.stack(batch_x0))
        finals.append(latents.float().cpu())
    return Trajectory(
        timesteps=timesteps,
        xt=torch.cat(xt_steps, dim=1),
        x0=torch.cat(x0_steps, dim=1),
        final=torch.cat(finals),
        seed=seed,
    )


def trained_trajectory(
    unet,
    scheduler,
    num_samples: int = 64,
    num_inference_steps: int = 50,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 64,
    device: torch.device | str = "cpu",
    show_progress: bool = True,
) -> Trajectory:
    r"""
    The DDIM trajectory of a trained network: a `DDIMScheduler` built from `scheduler`'s config (its training
    schedule, prediction type and clipping), then [`sample_trajectory`]. x0_hat at each step follows from the
    network's output with [`x0_from_model_output`].

    Args:
        unet: the trained network (`UNet2DModel` or anything called as `unet(x_t, t).sample` with a `config` that has
            `in_channels` and `sample_size`).
        scheduler: the trained pipeline's scheduler (any DDPM-type one, e.g. `DDPMScheduler`).
        num_samples, num_inference_steps, seed, eta, batch_size, device, show_progress: as in [`sample_trajectory`].
    """
    ddim = ddim_scheduler_like(scheduler)
    return sample_trajectory(
        unet_predictor(unet, ddim),
        ddim,
        unet_sample_shape(unet),
        num_samples,
        num_inference_steps,
        seed,
        eta,
        batch_size,
        device,
        show_progress,
    )


def unet_sample_shape(unet) -> tuple[int, int, int]:
    """`(C, H, W)` of a diffusers UNet from its config."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return (int(unet.config.in_channels), height, width)


@dataclass
class StepScores:
    """
    Scores of a prediction against a reference at every step of a trajectory.

    Args:
        timesteps (`list[int]`): `[S]`.
        r2 (`torch.Tensor`): float64 `[S, N]`, per step and sample ([`r2_score`]).
        mse (`torch.Tensor`): float64 `[S, N]` ([`mse_score`]).
        x0 (`torch.Tensor`, *optional*): the scored predictions, `[S, N, C, H, W]`.
    """

    timesteps: list[int]
    r2: torch.Tensor
    mse: torch.Tensor
    x0: torch.Tensor | None = None

    def summary(self) -> dict:
        """Per-step means and standard deviations over samples (NaN scores of constant targets left out), as lists."""
        r2 = self.r2
        valid = ~torch.isnan(r2)
        count = valid.sum(dim=1).clamp(min=1)
        r2_mean = torch.where(valid, r2, 0.0).sum(dim=1) / count
        r2_std = (torch.where(valid, r2 - r2_mean[:, None], 0.0).pow(2).sum(dim=1) / count).sqrt()
        return {
            "timesteps": list(self.timesteps),
            "r2_mean": r2_mean.tolist(),
            "r2_std": r2_std.tolist(),
            "mse_mean": self.mse.mean(dim=1).tolist(),
            "mse_std": self.mse.std(dim=1, unbiased=False).tolist(),
        }


def score_steps(pred_x0: torch.Tensor, target_x0: torch.Tensor, timesteps: list[int], keep: bool = True) -> StepScores:
    """R^2 and MSE of `pred_x0` against `target_x0`, both `[S, N, C, H, W]`, at every step."""
    if pred_x0.shape != target_x0.shape:
        raise ValueError(f"Predictions {list(pred_x0.shape)} and targets {list(target_x0.shape)} differ in shape.")
    r2 = torch.stack([r2_score(p, q) for p, q in zip(pred_x0, target_x0)])  # [S, N]
    mse = torch.stack([mse_score(p, q) for p, q in zip(pred_x0, target_x0)])  # [S, N]
    return StepScores(list(timesteps), r2, mse, pred_x0 if keep else None)


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
    num_samples = trajectory.xt.shape[1]
    batches = [list(range(s, min(s + batch_size, num_samples))) for s in range(0, num_samples, batch_size)]
    generators = {tuple(b): generators_for_indices(trajectory.seed, b) for b in batches}
    predictions = torch.empty_like(trajectory.x0)
    for step, t in enumerate(tqdm(trajectory.timesteps, desc="Single-step", unit="step", disable=not show_progress)):
        for batch in batches:
            x_t = trajectory.xt[step, batch[0] : batch[-1] + 1].to(device)
            predictions[step, batch[0] : batch[-1] + 1] = predict(x_t, t, generators[tuple(batch)]).float().cpu()
    return score_steps(predictions, trajectory.x0, trajectory.timesteps)


# ---------------------------------------------------------------------------------------------- the whole comparison
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


def check_same_schedule(denoiser, scheduler) -> None:
    """Raises a ValueError when the trained `scheduler`'s noise schedule (or image shape of a UNet) is not the denoiser's."""
    problem = schedule_mismatch(denoiser, scheduler)
    if problem is not None:
        raise ValueError(
            "The analytic denoiser and the trained model must share one noise schedule to be compared on the same "
            f"x_t. {problem} Refit the analytic denoiser with the trained model's schedule "
            "(`from_dataset(..., beta_schedule=..., beta_start=..., beta_end=...)`)."
        )


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
    3. own trajectory: the analytic denoiser's DDIM trajectory from the same x_T (the same scheduler config, with the
       denoiser's prediction type), its x0_hat at every step scored against the trained one, and the final samples.

    Args:
        denoiser: an analytic denoiser ([`AnalyticDenoiserMixin`]).
        unet, scheduler: the trained pipeline's network and scheduler; the scheduler's `alphas_cumprod` must equal the
            denoiser's (else a ValueError), and the network's `in_channels` / `sample_size` the denoiser's.
        num_samples, num_inference_steps, seed, eta, batch_size, device, show_progress: as in [`sample_trajectory`].
    """
    check_same_schedule(denoiser, scheduler)
    shape = unet_sample_shape(unet)
    if tuple(shape) != tuple(denoiser.sample_shape):
        raise ValueError(
            f"The trained network makes samples of shape {list(shape)} (in_channels, sample_size) but the analytic "
            f"denoiser's are {list(denoiser.sample_shape)}."
        )
    # 1. The trained trajectory, and 2. the analytic x0_hat on its x_t.
    trained = trained_trajectory(
        unet, scheduler, num_samples, num_inference_steps, seed, eta, batch_size, device, show_progress
    )
    single_step = evaluate_on_trajectory(denoiser, trained, batch_size, device, show_progress)

    # 3. The analytic denoiser's own trajectory from the same x_T, with the same DDIM settings.
    analytic_scheduler = ddim_scheduler_like(scheduler, prediction_type=denoiser.config.prediction_type)
    analytic = sample_trajectory(
        denoiser_predictor(denoiser),
        analytic_scheduler,
        shape,
        num_samples,
        num_inference_steps,
        seed,
        eta,
        batch_size,
        device,
        show_progress,
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
