"""Sampling trajectories (x_t and x0_hat at every step) of a trained network and of an analytic denoiser.

Sample i of a run with seed s starts from the noise of the generator of `(s, i)` and draws all its later randomness
from it (see `diffusers_analytic.utils.seeding`), so a trajectory does not depend on the batch size, and a trained
network and an analytic denoiser run with the same seed start from the same x_T.

- [`analytic_trajectory`] is the [`AnalyticDDIMPipeline`]'s own sampling loop (`return_intermediates=True`).
- [`trained_trajectory`] is a short DDIM loop around a trained network (`UNet2DModel` or anything called as
  `unet(x_t, t).sample`). The analytic pipeline cannot host it: it needs an analytic denoiser (its `sample_shape`,
  `alphas_cumprod`, an output with `pred_original_sample`, the `generator=` and `class_labels=` keywords), and
  diffusers' `DDIMPipeline` returns only clamped final images, with no per-step x_t or x0_hat. The loop draws x_T as
  the pipeline does (`randn_tensor` with one generator per sample) and gets x0_hat with [`x0_from_model_output`].
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor
from tqdm.auto import tqdm

from ..kernels.schedule import MIN_BETA_PROD
from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline
from ..utils.seeding import generators_for_indices

# x0 from an epsilon prediction divides by sqrt(a), and a = 0 at the last step of a zero-terminal-SNR schedule. a is
# floored as 1 - a is where the denoisers divide by it (MIN_BETA_PROD), with the same value, so x0 stays finite.
_MIN_ALPHA_PROD = MIN_BETA_PROD


@dataclass
class Trajectory:
    """
    A sampling trajectory of `N` samples over `S` steps (all on the CPU).

    Args:
        timesteps (`list[int]`): the scheduler's timestep at each step, `[S]` (floats for schedulers with fractional
            timesteps).
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


def ddim_scheduler_like(scheduler, **overrides) -> DDIMScheduler:
    """A `DDIMScheduler` with `scheduler`'s training schedule and prediction type (as diffusers' `DDIMPipeline` builds)."""
    accepted = set(inspect.signature(DDIMScheduler.__init__).parameters)
    config = {k: v for k, v in dict(scheduler.config).items() if k in accepted}
    return DDIMScheduler(**{**config, **overrides})


def unet_sample_shape(unet) -> tuple[int, int, int]:
    """`(C, H, W)` of a diffusers UNet from its config."""
    size = unet.config.sample_size
    height, width = (size, size) if isinstance(size, int) else (int(size[0]), int(size[1]))
    return (int(unet.config.in_channels), height, width)


def _index_batches(num_samples: int, num_inference_steps: int, batch_size: int) -> list[list[int]]:
    if num_samples < 1 or num_inference_steps < 1 or batch_size < 1:
        raise ValueError(
            f"`num_samples`, `num_inference_steps` and `batch_size` must be positive, got {num_samples}, "
            f"{num_inference_steps} and {batch_size}."
        )
    return [list(range(start, min(start + batch_size, num_samples))) for start in range(0, num_samples, batch_size)]


def _concatenate(parts: list[Trajectory], seed: int) -> Trajectory:
    """The batches' trajectories as one: samples side by side (dimension 1 of `xt` and `x0`)."""
    return Trajectory(
        timesteps=parts[0].timesteps,
        xt=torch.cat([part.xt for part in parts], dim=1),
        x0=torch.cat([part.x0 for part in parts], dim=1),
        final=torch.cat([part.final for part in parts]),
        seed=seed,
    )


@torch.no_grad()
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
    schedule, prediction type and clipping, see [`ddim_scheduler_like`]), x_T of sample i from the generator of
    `(seed, i)`, and x0_hat at each step from the network's output with [`x0_from_model_output`].

    Args:
        unet: the trained network (`UNet2DModel` or anything called as `unet(x_t, t).sample` with a `config` that has
            `in_channels` and `sample_size`), already on `device`. An output of 2C channels (a learned variance) is cut
            to its first C.
        scheduler: the trained pipeline's scheduler (any DDPM-type one, e.g. `DDPMScheduler`).
        num_samples (`int`, defaults to 64): N.
        num_inference_steps (`int`, defaults to 50): S.
        seed (`int`, defaults to 0): the run's seed.
        eta (`float`, defaults to 0.0): DDIM's eta.
        batch_size (`int`, defaults to 64): samples per forward pass.
        device: where the network runs.
        show_progress (`bool`, defaults to `True`): a tqdm bar over batches.
    """
    batches = _index_batches(num_samples, num_inference_steps, batch_size)
    ddim = ddim_scheduler_like(scheduler)
    alphas_cumprod = torch.as_tensor(ddim.alphas_cumprod).detach().to("cpu", torch.float64)
    prediction_type = ddim.config.prediction_type
    shape = unet_sample_shape(unet)
    parts = []
    for indices in tqdm(batches, desc="Trained trajectory", unit="batch", disable=not show_progress):
        generators = generators_for_indices(seed, indices)
        latents = randn_tensor((len(indices), *shape), generator=generators, device=device, dtype=torch.float32)
        latents = latents * ddim.init_noise_sigma
        ddim.set_timesteps(num_inference_steps, device=device)
        xt, x0 = [], []
        for t in ddim.timesteps:
            model_input = ddim.scale_model_input(latents, t)
            model_output = unet(model_input, t).sample
            if model_output.shape[1] == 2 * shape[0]:  # a learned variance rides along: drop it
                model_output = model_output[:, : shape[0]]
            x0_hat = x0_from_model_output(model_output, model_input, alphas_cumprod[int(t)], prediction_type)
            xt.append(model_input.float().cpu())
            x0.append(x0_hat.float().cpu())
            latents = ddim.step(model_output, t, latents, eta=eta, generator=generators).prev_sample
        timesteps = [int(t) for t in ddim.timesteps]
        parts.append(Trajectory(timesteps, torch.stack(xt), torch.stack(x0), latents.float().cpu(), seed))
    return _concatenate(parts, seed)


@torch.no_grad()
def analytic_trajectory(
    denoiser,
    scheduler=None,
    num_samples: int = 64,
    num_inference_steps: int = 50,
    seed: int = 0,
    eta: float = 0.0,
    batch_size: int = 64,
    device: torch.device | str | None = None,
    show_progress: bool = True,
) -> Trajectory:
    r"""
    The trajectory of an analytic denoiser: [`AnalyticDDIMPipeline`] with `scheduler`, called per batch of sample
    indices with one generator per sample (`(seed, i)`), `output_type="latent"` and `return_intermediates=True`.

    Args:
        denoiser: an analytic denoiser ([`AnalyticDenoiserMixin`]).
        scheduler (*optional*): any scheduler the pipeline accepts; defaults to a `DDIMScheduler` with the denoiser's
            schedule. Its `set_timesteps` is called per batch.
        num_samples, num_inference_steps, seed, eta, batch_size, show_progress: as in [`trained_trajectory`].
        device (*optional*): where the denoiser runs; it is moved there. Defaults to where it is.

    Returns:
        [`Trajectory`]: `xt` is the VP sample the denoiser sees (for DDPM-type schedulers the scheduler's model
        input), `x0` its x0_hat.
    """
    batches = _index_batches(num_samples, num_inference_steps, batch_size)
    pipeline = AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler)
    if device is not None:
        pipeline.to(device)
    pipeline.set_progress_bar_config(disable=True)
    parts = []
    for indices in tqdm(batches, desc="Analytic trajectory", unit="batch", disable=not show_progress):
        output = pipeline(
            batch_size=len(indices),
            generator=generators_for_indices(seed, indices),
            num_inference_steps=num_inference_steps,
            eta=eta,
            output_type="latent",
            return_intermediates=True,
        )
        timesteps = list(output.timesteps)  # ints for DDPM-type schedulers
        xt, x0 = torch.stack(output.trajectory_xt).float(), torch.stack(output.trajectory_x0).float()
        parts.append(Trajectory(timesteps, xt, x0, output.images.float().cpu(), seed))
    return _concatenate(parts, seed)
