"""The training noise schedule: one source for its config keys, a(t) tables and the floors that keep 1 - a away from
zero.

Notation: VP diffusion x_t = sqrt(a_t) x_0 + sqrt(1 - a_t) eps with a_t = alphas_cumprod[t], and the noise level
sigma = sqrt((1 - a) / a) that Euler-type and EDM schedulers use.
"""

from __future__ import annotations

import torch
from diffusers import DDIMScheduler

# The config keys that define a DDPM noise schedule (as in diffusers' `DDIMScheduler`); every denoiser takes them.
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
)
BETA_SCHEDULES = ("linear", "scaled_linear", "squaredcos_cap_v2")

# Where 1 - a is exactly zero (a schedule whose first beta is 0), divisions by 1 - a or sqrt(1 - a) use this instead,
# so that epsilon, v and the posterior logits stay finite (the posterior becomes one-hot instead of NaN).
MIN_BETA_PROD = 1e-20


def alphas_cumprod_from_schedule(
    num_train_timesteps: int = 1000,
    beta_start: float = 0.0001,
    beta_end: float = 0.02,
    beta_schedule: str = "linear",
    trained_betas: list[float] | None = None,
    rescale_betas_zero_snr: bool = False,
) -> torch.Tensor:
    """
    The cumulative product of alphas of a DDPM noise schedule, float64 `[num_train_timesteps]` on the CPU.

    Computed by diffusers' own `DDIMScheduler`, so that it equals, bit for bit, the `alphas_cumprod` of any scheduler
    built from the same values.
    """
    if beta_schedule not in BETA_SCHEDULES and trained_betas is None:
        raise ValueError(f"`beta_schedule` must be one of {BETA_SCHEDULES}, got {beta_schedule!r}.")
    if trained_betas is not None and len(trained_betas) != num_train_timesteps:
        raise ValueError(
            f"`trained_betas` has {len(trained_betas)} entries but `num_train_timesteps` is {num_train_timesteps}."
        )
    scheduler = DDIMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_start=beta_start,
        beta_end=beta_end,
        beta_schedule=beta_schedule,
        trained_betas=trained_betas,
        rescale_betas_zero_snr=rescale_betas_zero_snr,
    )
    return scheduler.alphas_cumprod.to(torch.float64)


def log_sigma(alpha_prod: torch.Tensor) -> torch.Tensor:
    """log sigma with sigma = sqrt((1 - a) / a); +inf where a = 0 (zero terminal SNR)."""
    return 0.5 * (torch.log1p(-alpha_prod) - torch.log(alpha_prod))
