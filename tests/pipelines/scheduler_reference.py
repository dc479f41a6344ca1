"""
An independent float64 reference for tests/pipelines/test_schedulers.py: the exact posterior mean of a Gaussian
N(mu, S), written with a linear solve (not the Wiener denoiser's eigenbasis), driven through a diffusers scheduler by
a sampling loop written here from the schedulers' documented parametrisations.
"""

from __future__ import annotations

import inspect
import math

import diffusers
import numpy as np
import torch
from diffusers.utils.torch_utils import randn_tensor


class GaussianPosterior:
    """x0_hat(x_t, a) = mu + sqrt(a) S (a S + (1 - a) I)^-1 (x_t - sqrt(a) mu), all in float64."""

    def __init__(self, mean: torch.Tensor, covariance: torch.Tensor):
        self.mean = mean.double()  # [D]
        self.covariance = covariance.double()  # [D, D]

    def __call__(self, x_t: torch.Tensor, alpha_prod: float) -> torch.Tensor:
        shape = x_t.shape
        x = x_t.double().reshape(shape[0], -1).numpy()  # [B, D]
        mean, cov = self.mean.numpy(), self.covariance.numpy()
        system = alpha_prod * cov + (1 - alpha_prod) * np.eye(len(mean))  # a S + (1 - a) I
        residual = (x - math.sqrt(alpha_prod) * mean).T  # [D, B]
        x0 = mean[:, None] + math.sqrt(alpha_prod) * cov @ np.linalg.solve(system, residual)  # [D, B]
        return torch.from_numpy(x0.T.copy()).reshape(shape)


def log_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    a = alphas_cumprod.double()
    return 0.5 * (torch.log1p(-a) - torch.log(a))


def alpha_at_timestep(alphas_cumprod: torch.Tensor, t: float) -> float:
    """a(t) with log sigma interpolated linearly between integer steps (docs/math.md)."""
    ls = log_sigmas(alphas_cumprod)
    low = min(int(math.floor(t)), len(ls) - 1)
    high = min(low + 1, len(ls) - 1)
    frac = t - low
    if frac == 0:
        return float(alphas_cumprod.double()[low])
    log_sigma = ls[low] + frac * (ls[high] - ls[low])
    return float(torch.sigmoid(-2 * log_sigma))


def evaluation_sigma(scheduler, i: int) -> float:
    """The noise level the scheduler's step() integrates with when the model is called at loop step i."""
    index = scheduler.step_index if getattr(scheduler, "step_index", None) is not None else i
    first = getattr(scheduler, "state_in_first_order", True)
    if isinstance(scheduler, diffusers.KDPM2AncestralDiscreteScheduler) and not first:
        return float(scheduler.sigmas_interpol[index - 1])
    if isinstance(scheduler, diffusers.KDPM2DiscreteScheduler) and not first:
        return float(scheduler.sigmas_interpol[index])
    if isinstance(scheduler, diffusers.DPMSolverSDEScheduler) and not first:
        return float(scheduler.mid_point_sigma)
    return float(scheduler.sigmas[index])


def _prediction(x0, x_vp, a, prediction_type):
    """epsilon / v / x0 from x0 for VP x_t at a, float64."""
    if prediction_type == "sample":
        return x0
    eps = (x_vp - math.sqrt(a) * x0) / math.sqrt(1 - a)
    if prediction_type == "epsilon":
        return eps
    return math.sqrt(a) * eps - math.sqrt(1 - a) * x0


def reference_sample(
    posterior: GaussianPosterior,
    scheduler,
    kind: str,
    batch_size: int,
    sample_shape,
    seed: int,
    num_inference_steps: int,
    exact_sigmas: bool = True,
    denoiser_alphas_cumprod: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Final samples of `scheduler` driven by the float64 posterior from the same initial noise / generator as the
    pipeline. kind: "vp", "flow" or "edm". With `exact_sigmas=False` (vp only) the posterior is evaluated at the
    scheduler's timestep t (log-sigma interpolation of `denoiser_alphas_cumprod`), as a UNet would see it.

    The documented rule for noise levels outside the denoiser's schedule (`denoiser_alphas_cumprod`): the posterior
    is evaluated at the nearest end, a(0) or a(T - 1).
    """
    ends = None
    if denoiser_alphas_cumprod is not None:
        ends = (float(denoiser_alphas_cumprod[-1]), float(denoiser_alphas_cumprod[0]))

    def covered(a):
        return a if ends is None else min(max(a, ends[0]), ends[1])

    generator = torch.Generator().manual_seed(seed)
    latents = randn_tensor((batch_size, *sample_shape), generator=generator, dtype=torch.float32)
    latents = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    scheduler.set_timesteps(num_inference_steps)
    parameters = inspect.signature(scheduler.step).parameters
    step_kwargs = {}
    if "generator" in parameters:
        step_kwargs["generator"] = generator
    if "eta" in parameters:
        step_kwargs["eta"] = 0.0
    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    for i, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        if kind == "vp":
            if hasattr(scheduler, "sigmas") and exact_sigmas:
                sigma = evaluation_sigma(scheduler, i)
                a = covered(1.0 / (1.0 + sigma**2))
            elif denoiser_alphas_cumprod is not None:
                a = alpha_at_timestep(denoiser_alphas_cumprod, float(t))
            else:  # integer timesteps (DDIM, DDPM, PNDM): the scheduler's own schedule
                a = float(scheduler.alphas_cumprod.double()[int(t)])
            x0 = posterior(model_input, a)
            output = _prediction(x0, model_input.double(), a, prediction_type)
        elif kind == "flow":
            # x_s = (1 - s) x0 + s eps: the Gaussian posterior at a = (1 - s)^2 / ((1 - s)^2 + s^2) on x_s / r
            s = evaluation_sigma(scheduler, i)
            r = math.sqrt((1 - s) ** 2 + s**2)
            a = (1 - s) ** 2 / r**2
            x0 = posterior(latents.double() / r, covered(a))
            eps = (latents.double() - (1 - s) * x0) / s
            output = eps - x0  # velocity
        else:  # edm: x = x0 + sigma eps; output F with precondition_outputs(x, F, sigma) = x0 (affine in F)
            sigma = evaluation_sigma(scheduler, i)
            a = 1.0 / (1.0 + sigma**2)
            x = latents.double()
            x0 = posterior(x * math.sqrt(a), covered(a))
            sigma_t = torch.tensor(sigma, dtype=torch.float64)
            offset = scheduler.precondition_outputs(x, torch.zeros_like(x), sigma_t)
            slope = scheduler.precondition_outputs(x, torch.ones_like(x), sigma_t) - offset
            output = (x0 - offset) / slope
        latents = scheduler.step(output.float(), t, latents, **step_kwargs).prev_sample
    return latents
