"""
How an analytic denoiser meets every diffusers scheduler, exactly.

A denoiser knows one thing: the posterior mean x0_hat = E[x_0 | x_t] of VP diffusion,

    x_t = sqrt(a) x_0 + sqrt(1 - a) eps,     sigma = sqrt((1 - a) / a),

at any real timestep of its training schedule (`alpha_prod_at` interpolates log sigma between integer steps).
Schedulers differ in how they parametrise the noisy sample, which timestep they pass, and which prediction they
expect back. This module turns each scheduler's step into the denoiser's terms and its x0_hat back into the
scheduler's terms; [`AnalyticDDIMPipeline`] calls it once per step.

Three parametrisations, detected from the scheduler's class (`scheduler_parametrisation`):

- `"vp"`, DDPM-type schedulers (DDIM, DDPM, PNDM, Euler, Heun, LMS, DPM-Solver, DEIS, UniPC, SA-Solver, ...):
  their `scale_model_input` already gives the VP sample. Their noise schedule must equal the denoiser's. The
  prediction (epsilon, v or x0) is converted to the scheduler's `prediction_type` whatever the denoiser's is.
- `"flow"`, rectified-flow schedulers (`FlowMatchEulerDiscreteScheduler`, `FlowMatchHeunDiscreteScheduler`, and
  DPM-Solver multistep / singlestep, DEIS, UniPC, SA-Solver with `use_flow_sigmas=True`): x_s = (1 - s) x_0 + s eps
  with s = `sigmas[i]`, and the model predicts the velocity eps - x_0. The exact change of variables is x_vp = x_s / r, r = sqrt((1 - s)^2 + s^2), with
  sqrt(a) = (1 - s) / r, sqrt(1 - a) = s / r, i.e. sigma_vp = s / (1 - s); the velocity returned is
  (x_s - x0_hat) / s, from which the scheduler's x0 = x_s - s v is exactly x0_hat.
- `"edm"`, `EDMEulerScheduler`, `EDMDPMSolverMultistepScheduler`: x = x_0 + sigma eps (variance exploding), the model
  gets c_in x and c_noise = log(sigma) / 4. The denoiser gets x_vp = x / sqrt(1 + sigma^2) at sigma_vp = sigma, and
  returns F = (x0_hat - c_skip x) / c_out so that EDM's denoised = c_skip x + c_out F is exactly x0_hat.

Exact sigma. Several schedulers (DPM-Solver family, DEIS, UniPC, SA-Solver, KDPM2 with Karras / exponential / beta
sigmas) round the timestep they pass to the model, so a model would see a noise level up to ~1% (Karras) or ~10%
(exponential) away from the one the scheduler integrates with (measured with the default schedule and 10 steps).
With `exact_sigmas=True` the denoiser gets instead the fractional timestep whose log-sigma interpolation gives the
scheduler's own `sigmas` entry for this step (`scheduler_sigma`), while `step()` keeps the scheduler's t.

Noise levels outside the denoiser's training schedule (sigma_vp below sigma(0) or above sigma(T - 1), e.g. flow
matching's s = 1, EDM's sigma_min = 0.002 with the default schedule) are evaluated at the nearest covered level, with
a warning that says by how much. A denoiser fitted with `rescale_betas_zero_snr=True` covers sigma = inf (s = 1);
a smaller `beta_start` covers smaller sigmas.

Refused: consistency samplers (LCM, TCD, ...), inversion schedulers, and schedulers whose model or step has another
contract; see `REFUSED_SCHEDULERS`.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import diffusers
import torch
from diffusers.utils import logging

from .kernels import schedule
from .kernels.schedule import SCHEDULE_KEYS
from .models.modeling_analytic import PREDICTION_TYPES

logger = logging.get_logger(__name__)

# DDPM-type schedulers checked by tests/pipelines/test_schedulers.py (each with its sigma / spacing variants).
VP_SCHEDULERS = (
    "DDIMScheduler",
    "DDPMScheduler",
    "PNDMScheduler",
    "LMSDiscreteScheduler",
    "EulerDiscreteScheduler",
    "EulerAncestralDiscreteScheduler",
    "HeunDiscreteScheduler",
    "DPMSolverMultistepScheduler",
    "DPMSolverSinglestepScheduler",
    "KDPM2DiscreteScheduler",
    "KDPM2AncestralDiscreteScheduler",
    "DEISMultistepScheduler",
    "UniPCMultistepScheduler",
    "SASolverScheduler",
    "DDIMParallelScheduler",
    "DDPMParallelScheduler",
    "DPMSolverSDEScheduler",
)
FLOW_SCHEDULERS = ("FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler")
EDM_SCHEDULERS = ("EDMEulerScheduler", "EDMDPMSolverMultistepScheduler")

_CONSISTENCY = (
    "is a consistency-model sampler: each step maps x_t straight to x0 and re-noises it, which samples the data "
    "only with a distilled consistency model; with a posterior-mean denoiser it returns blurred averages"
)
_INVERSE = "runs diffusion forwards (image -> noise, for inversion), not generation"
REFUSED_SCHEDULERS = {
    "LCMScheduler": _CONSISTENCY,
    "TCDScheduler": _CONSISTENCY,
    "FlowMatchLCMScheduler": _CONSISTENCY,
    "CMStochasticIterativeScheduler": _CONSISTENCY,
    "SCMScheduler": _CONSISTENCY + " (and it uses the TrigFlow parametrisation)",
    "DDIMInverseScheduler": _INVERSE,
    "DPMSolverMultistepInverseScheduler": _INVERSE,
    "RePaintScheduler": "is an inpainting sampler whose step() needs the known image and a mask",
    "UnCLIPScheduler": "expects a model that also predicts its variance (unCLIP prior / decoder)",
    "VQDiffusionScheduler": "is a discrete (token) diffusion, not Gaussian",
    "AmusedScheduler": "is a masked-token sampler, not Gaussian diffusion",
    "ScoreSdeVeScheduler": "has its own predictor-corrector API (step_pred / step_correct) instead of step()",
    "IPNDMScheduler": "has no training noise schedule (alphas_cumprod) to match the denoiser's",
    "DDPMWuerstchenScheduler": "uses Wuerstchen's continuous cosine schedule, not a DDPM schedule of the denoiser",
    "CogVideoXDDIMScheduler": "shifts the SNR of its schedule (snr_shift_scale) for CogVideoX, a different schedule",
    "CogVideoXDPMScheduler": "shifts the SNR of its schedule (snr_shift_scale) for CogVideoX, a different schedule",
    "CosineDPMSolverMultistepScheduler": "uses a continuous cosine (Stable Audio) schedule, not the denoiser's",
}

# alias -> (class name, extra config)
SCHEDULER_ALIASES = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "ddim-parallel": ("DDIMParallelScheduler", {}),
    "ddpm-parallel": ("DDPMParallelScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "euler-a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "sde-dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm++2m-sde": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm-single": ("DPMSolverSinglestepScheduler", {}),
    "dpm++2s": ("DPMSolverSinglestepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm-sde": ("DPMSolverSDEScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "kdpm2-a": ("KDPM2AncestralDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "sa-solver": ("SASolverScheduler", {}),
    "flow-euler": ("FlowMatchEulerDiscreteScheduler", {}),
    "flow-heun": ("FlowMatchHeunDiscreteScheduler", {}),
    "edm-euler": ("EDMEulerScheduler", {}),
    "edm-dpm++2m": ("EDMDPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
}

# A noise level the denoiser does not cover is evaluated at the nearest covered one; a warning is logged when that
# changes a = 1 / (1 + sigma^2) by more than this. (Euler-type schedulers store sigma = 4096, a = 2**-24, for the
# zero-SNR endpoint a = 0; that substitute, and float32 rounding of the scheduler's sigmas, stay below it.)
OUT_OF_RANGE_ATOL = 1e-6


# ---------------------------------------------------------------------------------------------------- detection
def scheduler_parametrisation(scheduler) -> str:
    """
    `"vp"`, `"flow"` or `"edm"`: how `scheduler` parametrises the noisy sample (see the module docstring). Raises a
    ValueError naming why for a scheduler that cannot be right with an analytic denoiser.
    """
    name = type(scheduler).__name__
    config = scheduler.config
    if name in REFUSED_SCHEDULERS:
        raise ValueError(f"{name} cannot drive an analytic denoiser: it {REFUSED_SCHEDULERS[name]}.")
    variance_type = config.get("variance_type")
    if variance_type in ("learned", "learned_range"):
        raise ValueError(
            f"{name} with variance_type={variance_type!r} expects a model that also predicts its variance (twice the "
            "channels); analytic denoisers predict the mean only. Use variance_type='fixed_small' (the default)."
        )
    if config.get("invert_sigmas"):
        raise ValueError(f"{name} with invert_sigmas=True (Mochi's convention) is not supported; use the default.")
    if name in FLOW_SCHEDULERS or (config.get("use_flow_sigmas") and name in VP_SCHEDULERS):
        if name not in FLOW_SCHEDULERS and config.get("prediction_type") != "flow_prediction":
            raise ValueError(
                f"{name} with use_flow_sigmas=True needs prediction_type='flow_prediction', got "
                f"{config.get('prediction_type')!r}."
            )
        return "flow"
    if name in EDM_SCHEDULERS:
        if config.get("prediction_type") not in ("epsilon", "v_prediction"):
            raise ValueError(
                f"{name} reads the model output through c_skip / c_out for prediction_type 'epsilon' or "
                f"'v_prediction' only, got {config.get('prediction_type')!r}."
            )
        return "edm"
    if getattr(scheduler, "alphas_cumprod", None) is None:
        raise ValueError(
            f"{name} is not supported: it has no DDPM noise schedule (alphas_cumprod) and is neither a flow-matching "
            f"({', '.join(FLOW_SCHEDULERS)}) nor an EDM ({', '.join(EDM_SCHEDULERS)}) scheduler."
        )
    if config.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ValueError(
            f"{name} asks for prediction_type={config.get('prediction_type')!r}; analytic denoisers provide "
            f"{PREDICTION_TYPES}."
        )
    if name not in VP_SCHEDULERS and not isinstance(scheduler, tuple(getattr(diffusers, n) for n in VP_SCHEDULERS)):
        logger.warning(
            f"{name} is not among the schedulers checked with analytic denoisers; it is used as a DDPM-type "
            "scheduler (its alphas_cumprod matches the denoiser's)."
        )
    return "vp"


# ---------------------------------------------------------------------------------------------------- sigma <-> t
def scheduler_sigma(scheduler, index: int) -> float:
    """
    The noise level at which `scheduler` evaluates the model at step `index` (its `step_index`): `sigmas[index]`,
    except in the second stage of KDPM2 (`sigmas_interpol`) and of DPMSolverSDE (`mid_point_sigma`). For `"vp"`
    schedulers sigma = sqrt((1 - a) / a); for flow matching it is s; for EDM the VE sigma.
    """
    second_stage = not getattr(scheduler, "state_in_first_order", True)
    if second_stage and isinstance(scheduler, diffusers.KDPM2AncestralDiscreteScheduler):
        return float(scheduler.sigmas_interpol[index - 1])
    if second_stage and isinstance(scheduler, diffusers.KDPM2DiscreteScheduler):
        return float(scheduler.sigmas_interpol[index])
    if second_stage and getattr(scheduler, "mid_point_sigma", None) is not None:
        return float(scheduler.mid_point_sigma)
    return float(scheduler.sigmas[index])


def timestep_for_sigma(denoiser, sigma: float) -> tuple[float, bool]:
    r"""
    The fractional training timestep at which `denoiser` sees VP noise level `sigma`, and whether `sigma` lies
    outside what it covers.

    Inverts `AnalyticDenoiserMixin.alpha_prod_at`: with L[k] = log sigma(k) of the training schedule and
    L[k] <= log sigma < L[k + 1], t = k + (log sigma - L[k]) / (L[k + 1] - L[k]), so the denoiser's linear
    interpolation of log sigma gives back `sigma` (to float64 rounding). Outside [sigma(0), sigma(T - 1)], and between
    the last finite sigma and the a = 0 endpoint of a zero-terminal-SNR schedule, t is the nearest covered step
    (nearest in a = 1 / (1 + sigma^2)); the flag says whether that changes a by more than `OUT_OF_RANGE_ATOL`.
    """
    log_sigmas = schedule.log_sigma(denoiser.alphas_cumprod)  # [T] float64, increasing; +inf where a = 0
    last = len(log_sigmas) - 1
    log_sigma = math.log(sigma) if sigma > 0 else -math.inf
    alpha = 1.0 / (1.0 + sigma**2)

    def nearest(*steps):
        gaps = [abs(alpha - float(denoiser.alphas_cumprod[k])) for k in steps]
        best = min(range(len(steps)), key=gaps.__getitem__)
        return float(steps[best]), gaps[best] > OUT_OF_RANGE_ATOL

    if log_sigma <= log_sigmas[0]:
        return nearest(0)
    if log_sigma >= log_sigmas[last]:
        return nearest(last)
    k = int(torch.searchsorted(log_sigmas, torch.tensor([log_sigma], dtype=torch.float64), right=True)) - 1
    if math.isinf(log_sigmas[k + 1]):  # zero terminal SNR: no fractional t between sigma(T - 2) and sigma = inf
        return nearest(k, k + 1)
    frac = (log_sigma - float(log_sigmas[k])) / float(log_sigmas[k + 1] - log_sigmas[k])
    return k + frac, False


def sigma_range(denoiser) -> tuple[float, float]:
    """`(sigma(0), sigma(T - 1))` of the denoiser's training schedule (VP sigma; the second is inf with zero SNR)."""
    log_sigmas = schedule.log_sigma(denoiser.alphas_cumprod)
    return math.exp(float(log_sigmas[0])), math.exp(float(log_sigmas[-1]))


# ---------------------------------------------------------------------------------------------------- one step
@dataclass
class DenoiserStep:
    """
    One sampling step seen from the denoiser: call it on `sample` at `timestep`, then hand
    `scheduler_output(output)` to the scheduler's `step()`.

    Args:
        sample (`torch.Tensor` `[B, C, H, W]`): the VP sample x_t the denoiser is called on.
        timestep (`torch.Tensor` or the scheduler's t): the denoiser's timestep (0-d float64 when recomputed).
        parametrisation (`str`): `"vp"`, `"flow"` or `"edm"`.
        prediction_type (`str`): what the scheduler expects (`"epsilon"`, `"v_prediction"`, `"sample"`; the flow
            velocity and EDM's F are derived from x0_hat).
        latents (`torch.Tensor`): the scheduler's own sample (x_s for flow, the VE sample for EDM).
        sigma (`float`): the scheduler's noise level (s for flow, the VE sigma for EDM, sigma_vp for vp), or None.
        denoiser: the analytic denoiser (its schedule and `prediction_from_x0`).
        sigma_data (`float`): EDM's sigma_data (only for `"edm"`).
    """

    sample: torch.Tensor
    timestep: torch.Tensor | int | float
    parametrisation: str
    prediction_type: str
    latents: torch.Tensor
    sigma: float | None
    denoiser: object
    sigma_data: float = 0.5

    def scheduler_output(self, output) -> torch.Tensor:
        """The model output the scheduler's `step()` expects, from the denoiser's `forward` output."""
        x0_hat = output.pred_original_sample
        if self.parametrisation == "flow":
            # velocity eps - x0 = (x_s - x0_hat) / s, so that the scheduler's x0 = x_s - s v is x0_hat
            return (self.latents - x0_hat) / self.sigma
        if self.parametrisation == "edm":
            # F with c_skip x + c_out F = x0_hat (EDM, Karras et al. 2022, eq. (7))
            sigma, sigma_data = self.sigma, self.sigma_data
            c_skip = sigma_data**2 / (sigma**2 + sigma_data**2)
            c_out = sigma * sigma_data / (sigma**2 + sigma_data**2) ** 0.5
            if self.prediction_type == "v_prediction":
                c_out = -c_out
            return (x0_hat - c_skip * self.latents) / c_out
        if self.prediction_type == self.denoiser.config.prediction_type:
            return output.sample
        alpha_prod, beta_prod = self.denoiser.alpha_prod_at(self.timestep, self.sample.shape[0])
        device_dtype = torch.float32 if self.sample.device.type == "mps" else torch.float64
        alpha_prod, beta_prod = (
            alpha_prod.to(self.sample.device, device_dtype),
            beta_prod.to(self.sample.device, device_dtype),
        )
        prediction = self.denoiser.prediction_from_x0(
            x0_hat.float(), self.sample.float(), alpha_prod, beta_prod, prediction_type=self.prediction_type
        )
        return prediction.to(output.sample.dtype)


class SchedulerAdapter:
    """
    Turns each step of `scheduler` into a [`DenoiserStep`] for `denoiser` (see the module docstring). Make one per
    sampling run, after `set_timesteps`.

    Args:
        denoiser: an analytic denoiser.
        scheduler: a diffusers scheduler; refused ones raise a ValueError.
        exact_sigmas (`bool`, defaults to `True`): give the denoiser the timestep of the scheduler's own sigma at each
            step instead of the (possibly rounded) timestep the scheduler passes.
    """

    def __init__(self, denoiser, scheduler, exact_sigmas: bool = True):
        self.denoiser = denoiser
        self.scheduler = scheduler
        self.exact_sigmas = exact_sigmas
        self.parametrisation = scheduler_parametrisation(scheduler)
        self.prediction_type = scheduler.config.get("prediction_type") or "epsilon"
        self._warned = False

    def step_index(self, i: int) -> int:
        """The scheduler's index of loop step `i`: its `step_index` once set, else `begin_index` or `i`."""
        index = getattr(self.scheduler, "step_index", None)
        if index is None:
            index = getattr(self.scheduler, "begin_index", None)
        return i if index is None else int(index)

    def view(self, latents: torch.Tensor, model_input: torch.Tensor, t, i: int) -> DenoiserStep:
        """
        The denoiser's view of loop step `i`: `latents` is the scheduler's sample, `model_input` what its
        `scale_model_input` returned, `t` its timestep.
        """
        scheduler, parametrisation = self.scheduler, self.parametrisation
        has_sigmas = getattr(scheduler, "sigmas", None) is not None
        sigma = scheduler_sigma(scheduler, self.step_index(i)) if has_sigmas else None
        num_train_timesteps = scheduler.config.get("num_train_timesteps", 1000)
        kwargs = dict(parametrisation=parametrisation, prediction_type=self.prediction_type, denoiser=self.denoiser)

        if parametrisation == "vp":
            # 1. The VP sample is what the scheduler feeds a UNet; its timestep, or the one of its exact sigma.
            if not (self.exact_sigmas and has_sigmas):
                return DenoiserStep(sample=model_input, timestep=t, latents=latents, sigma=sigma, **kwargs)
            return DenoiserStep(
                sample=model_input, timestep=self._timestep(sigma, i), latents=latents, sigma=sigma, **kwargs
            )

        if parametrisation == "flow":
            # 2. x_vp = x_s / r, r = sqrt((1 - s)^2 + s^2), at sigma_vp = s / (1 - s)
            s = sigma if (self.exact_sigmas and has_sigmas) else float(t) / num_train_timesteps
            if not 0 < s <= 1:
                raise ValueError(f"Flow-matching noise level s must lie in (0, 1], got {s} at step {i}.")
            r = math.sqrt((1 - s) ** 2 + s**2)
            sigma_vp = s / (1 - s) if s < 1 else math.inf
            return DenoiserStep(
                sample=latents / r, timestep=self._timestep(sigma_vp, i), latents=latents, sigma=s, **kwargs
            )

        # 3. EDM: x = x_0 + sigma eps, x_vp = x / sqrt(1 + sigma^2), sigma_vp = sigma (c_noise = log(sigma) / 4)
        sigma = sigma if (self.exact_sigmas and has_sigmas) else math.exp(4.0 * float(t))
        sample = latents / math.sqrt(1.0 + sigma**2)
        return DenoiserStep(
            sample=sample,
            timestep=self._timestep(sigma, i),
            latents=latents,
            sigma=sigma,
            sigma_data=scheduler.config.sigma_data,
            **kwargs,
        )

    def _timestep(self, sigma_vp: float, i: int) -> torch.Tensor:
        t, outside = timestep_for_sigma(self.denoiser, sigma_vp)
        if outside and not self._warned:
            low, high = sigma_range(self.denoiser)
            logger.warning(
                f"Step {i} of {type(self.scheduler).__name__} asks for the VP noise level sigma = {sigma_vp:.6g}, outside "
                f"the denoiser's training schedule [{low:.6g}, {high:.6g}]; it is evaluated at the nearest covered "
                f"timestep t = {t:g} (later steps outside the range are not reported). To cover it, build the denoiser "
                "with `rescale_betas_zero_snr=True` (sigma = inf) or a smaller `beta_start`, or restrict the "
                "scheduler's sigmas."
            )
            self._warned = True
        return torch.tensor(t, dtype=torch.float64)


# ---------------------------------------------------------------------------------------------------- CLI names
def scheduler_class_and_config(name: str):
    """`(scheduler class, extra config)` for an alias (`"dpm++2m"`) or a diffusers class name (`"UniPCMultistepScheduler"`)."""
    key = name.lower()
    if key in SCHEDULER_ALIASES:
        class_name, extra = SCHEDULER_ALIASES[key]
        return getattr(diffusers, class_name), dict(extra)
    scheduler_class = getattr(diffusers, name, None) if name.endswith("Scheduler") else None
    if scheduler_class is None:
        raise ValueError(
            f"Unknown scheduler {name!r}; use a diffusers scheduler class name or one of {sorted(SCHEDULER_ALIASES)}."
        )
    if name in REFUSED_SCHEDULERS:
        raise ValueError(f"{name} cannot drive an analytic denoiser: it {REFUSED_SCHEDULERS[name]}.")
    return scheduler_class, {}


def make_scheduler(name: str, base_config, karras: bool = False, **overrides):
    """
    A scheduler named `name` (class name or alias), built with `from_config` from `base_config` (a pipeline's
    current scheduler config, so the training schedule and prediction type carry over), plus `use_karras_sigmas=True`
    with `karras`.

    The training-schedule keys of `base_config` are passed explicitly: diffusers' `from_config` drops values that were
    left at their defaults in `base_config`, and other classes have other defaults (Euler's beta_start is 0.00085).
    """
    scheduler_class, extra = scheduler_class_and_config(name)
    class_name = scheduler_class.__name__
    accepted = set(inspect.signature(scheduler_class.__init__).parameters)
    if karras:
        if class_name in EDM_SCHEDULERS:
            extra["sigma_schedule"] = "karras"
        elif "use_karras_sigmas" in accepted:
            extra["use_karras_sigmas"] = True
        else:
            raise ValueError(f"{class_name} has no Karras sigmas (`use_karras_sigmas`); drop --karras.")
    if class_name in FLOW_SCHEDULERS or class_name in EDM_SCHEDULERS:
        # Their own sigma range and prediction; nothing of a DDPM config carries over.
        return scheduler_class(**{**extra, **overrides})
    schedule = {k: base_config[k] for k in (*SCHEDULE_KEYS, "prediction_type") if k in base_config and k in accepted}
    return scheduler_class.from_config(base_config, **{**schedule, **extra, **overrides})
