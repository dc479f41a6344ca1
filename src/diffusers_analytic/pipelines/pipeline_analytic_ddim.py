"""AnalyticDDIMPipeline: an analytic denoiser in the place of a UNet, with any diffusers scheduler."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import PIL.Image
import torch
from diffusers import DDIMScheduler, DiffusionPipeline
from diffusers.utils import BaseOutput, logging
from diffusers.utils.torch_utils import randn_tensor

from .. import __version__
from ..kernels.cost import LONG_RUN_FLOPS, time_at_stated_rates
from ..kernels.schedule import SCHEDULE_KEYS
from ..saving import check_saved_version
from ..schedulers import SchedulerAdapter, scheduler_parametrisation

logger = logging.get_logger(__name__)

# Relative tolerance when comparing the scheduler's alphas_cumprod with the denoiser's: both are built by diffusers
# from the same config, so they agree to float32 rounding; Euler-type schedulers with zero terminal SNR replace the
# last entry 0 by 2**-24, which the absolute tolerance admits.
_SCHEDULE_RTOL, _SCHEDULE_ATOL = 1e-5, 1e-6


@dataclass
class AnalyticPipelineOutput(BaseOutput):
    """
    Output of [`AnalyticDDIMPipeline`].

    Args:
        images (`list[PIL.Image.Image]`, `np.ndarray` or `torch.Tensor`):
            The generated images: PIL images, a `[B, H, W, C]` array or a `[B, C, H, W]` tensor in `[0, 1]`, or with
            `output_type="latent"` the raw final sample in model space (no clamp).
        trajectory_xt (`list[torch.Tensor]`, *optional*):
            With `return_intermediates=True`: the VP sample x_t fed to the denoiser at each step, `[B, C, H, W]`
            each (on the CPU); for flow-matching and EDM schedulers the scheduler's sample rescaled to VP.
        trajectory_x0 (`list[torch.Tensor]`, *optional*):
            With `return_intermediates=True`: the denoiser's x0_hat at each step.
        timesteps (`list`, *optional*):
            With `return_intermediates=True`: the scheduler's timestep at each step.
    """

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    trajectory_xt: list[torch.Tensor] | None = None
    trajectory_x0: list[torch.Tensor] | None = None
    timesteps: list | None = None


def schedule_mismatch(denoiser, scheduler) -> str | None:
    """
    A sentence describing why `scheduler` cannot drive `denoiser`, or None if it can: a refused scheduler (see
    `diffusers_analytic.schedulers`), or a DDPM-type scheduler whose noise schedule differs from the denoiser's.
    Flow-matching and EDM schedulers have no DDPM schedule to compare; noise levels outside the denoiser's range are
    evaluated at the nearest covered one, with a warning, while sampling.
    """
    try:
        parametrisation = scheduler_parametrisation(scheduler)
    except ValueError as error:
        return str(error)
    if parametrisation != "vp":
        return None
    scheduler_alphas = getattr(scheduler, "alphas_cumprod", None)
    if scheduler_alphas is None:
        return (
            f"{type(scheduler).__name__} has no `alphas_cumprod` (it is not a DDPM-type scheduler), so its noise "
            "schedule cannot be matched with the denoiser's."
        )
    ours = denoiser.alphas_cumprod
    theirs = torch.as_tensor(scheduler_alphas).detach().to("cpu", torch.float64)
    if theirs.shape != ours.shape or not torch.allclose(theirs, ours, rtol=_SCHEDULE_RTOL, atol=_SCHEDULE_ATOL):
        keys = [k for k in SCHEDULE_KEYS if k != "trained_betas"]  # (a list of 1000 numbers: mentioned, not shown)
        describe = lambda config: ", ".join(f"{k}={config.get(k)}" for k in keys)  # noqa: E731
        has_trained = lambda config: " (with trained_betas)" if config.get("trained_betas") is not None else ""  # noqa: E731
        return (
            f"The scheduler's noise schedule ({describe(scheduler.config)}{has_trained(scheduler.config)}) differs "
            f"from the denoiser's ({describe(denoiser.config)}{has_trained(denoiser.config)}). Build the scheduler "
            "from the denoiser's schedule, e.g. `DDIMScheduler(**{k: denoiser.config[k] for k in (...)})`."
        )
    return None


def _check_call_arguments(batch_size, num_inference_steps, eta, output_type) -> None:
    """A ValueError naming the argument of a pipeline call that has no meaning (before any noise is drawn)."""
    for name, value in (("batch_size", batch_size), ("num_inference_steps", num_inference_steps)):
        if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
            raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
    if isinstance(eta, bool) or not isinstance(eta, numbers.Real) or not math.isfinite(eta) or eta < 0:
        raise ValueError(f"`eta` must be a finite number >= 0 (0 = deterministic DDIM, 1 = DDPM-like), got {eta!r}.")
    if output_type not in ("pil", "np", "pt", "latent"):
        raise ValueError(f"`output_type` must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}.")


def _warn_if_long(denoiser, batch_size: int, num_calls: int, guidance_scale) -> None:
    """
    Logs a warning with the estimated work and time before a run that would take long (`LONG_RUN_FLOPS`, about 10
    minutes at 100 GFLOP/s, scaled by the denoiser's `gemm_rate_fraction`), with the time it would take at two stated
    rates (`kernels.cost`): the float32 GEMM rate of a few CPU cores and a data-center GPU's.
    """
    per_call = denoiser.estimated_flops(batch_size) if hasattr(denoiser, "estimated_flops") else None
    if per_call is None:
        return
    if guidance_scale is not None and guidance_scale not in (0, 1):
        per_call *= 2  # the unconditional and the class-conditional term
    total = per_call * num_calls
    fraction = getattr(denoiser, "gemm_rate_fraction", 1.0)
    if total / fraction < LONG_RUN_FLOPS:
        return
    logger.warning(
        f"This run needs about {total / 1e12:.3g} TFLOP ({num_calls} denoiser calls of {per_call / 1e9:.3g} GFLOP "
        f"for {batch_size} images with {type(denoiser).__name__}): {time_at_stated_rates(total, fraction)}. Fewer "
        "images, steps or stored images make it shorter."
    )


def scheduler_from_denoiser(denoiser, scheduler_class=DDIMScheduler, **kwargs):
    """A scheduler of `scheduler_class` with the denoiser's training schedule and prediction type."""
    config = {k: denoiser.config[k] for k in SCHEDULE_KEYS}
    config["prediction_type"] = denoiser.config.prediction_type
    accepted = inspect.signature(scheduler_class.__init__).parameters
    config = {k: v for k, v in config.items() if k in accepted}
    return scheduler_class(**{**config, **kwargs})


class AnalyticDDIMPipeline(DiffusionPipeline):
    r"""
    Unconditional (or class-conditional) image generation with an analytic denoiser.

    The denoiser sits where a trained UNet would (`unet`), so the sampling loop is diffusers' own: any DDPM-type
    scheduler with the same training noise schedule works (`init_noise_sigma`, `scale_model_input`, `step`), and so do
    flow-matching and EDM schedulers, through the exact change of variables to the denoiser's VP posterior mean. The
    denoiser's prediction is converted to the scheduler's `prediction_type`. Consistency samplers (LCM, TCD) and
    other incompatible schedulers are refused with a ValueError; see `diffusers_analytic.schedulers`.

    Args:
        unet ([`AnalyticDenoiserMixin`] model):
            An analytic denoiser, e.g. [`WienerDenoiser`].
        scheduler ([`SchedulerMixin`], *optional*):
            Defaults to a [`DDIMScheduler`] with the denoiser's schedule. A DDPM-type scheduler's `alphas_cumprod`
            must equal the denoiser's, else a ValueError naming both.
    """

    model_cpu_offload_seq = "unet"
    _optional_components = ["scheduler"]

    def __init__(self, unet, scheduler=None):
        super().__init__()
        if scheduler is None:
            scheduler = scheduler_from_denoiser(unet)
        problem = schedule_mismatch(unet, scheduler)
        if problem is not None:
            raise ValueError(problem)
        self.register_modules(unet=unet, scheduler=scheduler)
        self.register_to_config(_diffusers_analytic_version=__version__)  # written to model_index.json

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        Loads a pipeline saved with `save_pretrained` from a local folder or a Hub repo id (downloads are cached; with
        `HF_HUB_OFFLINE=1` or `local_files_only=True` only the cache is read). Accepts diffusers' usual keywords
        (`revision`, `cache_dir`, `token`, `local_files_only`, `torch_dtype`, ...).

        The generic `DiffusionPipeline.from_pretrained` cannot resolve this class; use this one.
        """
        # Refuses folders of a newer diffusers-analytic and imports our component modules that model_index.json names.
        check_saved_version(pretrained_model_name_or_path, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, **kwargs)

    def _prepare_extra_step_kwargs(self, generator, eta):
        # Not every scheduler takes `eta` (DDIM only) or `generator` (stochastic ones do).
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        extra = {}
        if "eta" in parameters:
            extra["eta"] = eta
        if "generator" in parameters:
            extra["generator"] = generator
        return extra

    @torch.no_grad()
    def __call__(
        self,
        batch_size: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        num_inference_steps: int = 50,
        eta: float = 0.0,
        output_type: str = "pil",
        return_dict: bool = True,
        return_intermediates: bool = False,
        class_labels: torch.Tensor | list[int] | int | None = None,
        guidance_scale: float | None = None,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
        exact_sigmas: bool = True,
    ) -> AnalyticPipelineOutput | tuple:
        r"""
        Generates images.

        Args:
            batch_size (`int`, defaults to 1): number of images.
            generator (`torch.Generator` or `list[torch.Generator]`, *optional*):
                Makes generation deterministic. A list gives every image its own generator (initial noise, scheduler
                noise and the denoiser's noise), so image k does not depend on the batch it is generated in.
            num_inference_steps (`int`, defaults to 50): denoising steps.
            eta (`float`, defaults to 0.0): DDIM's eta (0 deterministic, 1 DDPM-like); ignored by schedulers without it.
            output_type (`str`, defaults to `"pil"`): `"pil"`, `"np"` (`[B, H, W, C]` in [0, 1]), `"pt"`
                (`[B, C, H, W]` in [0, 1]) or `"latent"` (the raw final sample in model space, no clamp).
            return_dict (`bool`, defaults to `True`): return an [`AnalyticPipelineOutput`] instead of a tuple.
            return_intermediates (`bool`, defaults to `False`): also return x_t, x0_hat and t at every step.
            class_labels (`int`, `list[int]` or `torch.Tensor`, *optional*): one label per image (or one for all),
                for denoisers fitted with labels.
            guidance_scale (`float`, *optional*): classifier-free guidance w with `class_labels`: the denoiser's
                prediction is eps_all + w (eps_class - eps_all) (unconditional: all stored images). `None` or 1 is
                the class-conditional result, 0 the unconditional one; w > 1 pushes samples further into the class.
            callback_on_step_end (`Callable`, *optional*): called as `callback(pipe, i, t, callback_kwargs)` after
                every step, with the tensors named in `callback_on_step_end_tensor_inputs` (default `["latents"]`; also
                `"model_output"`, the prediction handed to the scheduler, and `"x0_hat"`);
                the dict it returns may replace `latents`.
            exact_sigmas (`bool`, defaults to `True`): give the denoiser the (fractional) timestep of the noise level
                the scheduler integrates with at each step (its `sigmas` entry) rather than the timestep it passes,
                which several schedulers round (DPM-Solver, DEIS, UniPC, SA-Solver with Karras / exponential sigmas).
                `step()` always gets the scheduler's own timestep. `False` reproduces what a UNet would see.

        Examples:

        ```py
        >>> import diffusers_analytic as da
        >>> images = da.load_builtin("digits").images
        >>> denoiser = da.WienerDenoiser.from_dataset(images, show_progress=False)
        >>> pipe = da.AnalyticDDIMPipeline(unet=denoiser)
        >>> out = pipe(batch_size=4, num_inference_steps=20, generator=torch.Generator().manual_seed(0))
        >>> out.images[0].size
        (8, 8)
        ```

        Returns:
            [`AnalyticPipelineOutput`] or `tuple`: the images first, then (with `return_intermediates`) the
            trajectories and timesteps.
        """
        _check_call_arguments(batch_size, num_inference_steps, eta, output_type)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} images.")
        problem = schedule_mismatch(self.unet, self.scheduler)  # the scheduler may have been swapped since __init__
        if problem is not None:
            raise ValueError(problem)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]

        # 1. Initial noise x_T, one draw per generator.
        shape = (batch_size, *self.unet.sample_shape)
        device = self._execution_device
        latents = randn_tensor(shape, generator=generator, device=device, dtype=torch.float32)
        latents = latents * getattr(self.scheduler, "init_noise_sigma", 1.0)  # flow matching starts at x_1 = noise

        # 2. The scheduler's timesteps, and how its steps map to the denoiser's VP posterior mean.
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        adapter = SchedulerAdapter(self.unet, self.scheduler, exact_sigmas=exact_sigmas)
        extra_step_kwargs = self._prepare_extra_step_kwargs(generator, eta)
        trajectory_xt, trajectory_x0, timesteps = [], [], []
        _warn_if_long(self.unet, batch_size, len(self.scheduler.timesteps), guidance_scale)

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            # 3. The denoiser on the VP sample x_t, at the timestep of the scheduler's noise level.
            model_input = self._scale_model_input(latents, t)
            view = adapter.view(latents, model_input, t, i)
            output = self.unet(
                view.sample,
                view.timestep,
                class_labels=class_labels,
                generator=generator,
                guidance_scale=guidance_scale,
            )
            if return_intermediates:
                trajectory_xt.append(view.sample.cpu())
                trajectory_x0.append(output.pred_original_sample.cpu())
                timesteps.append(t.item() if isinstance(t, torch.Tensor) else t)

            # 4. The prediction the scheduler asks for (epsilon, v, x0, flow velocity or EDM's F), then x_t -> x_{t-1}.
            model_output = view.scheduler_output(output)
            latents = self.scheduler.step(model_output, t, latents, **extra_step_kwargs).prev_sample

            if callback_on_step_end is not None:
                available = {"latents": latents, "model_output": model_output, "x0_hat": output.pred_original_sample}
                callback_kwargs = {name: available[name] for name in tensor_inputs}
                callback_outputs = callback_on_step_end(self, i, t, callback_kwargs) or {}
                latents = callback_outputs.pop("latents", latents)

        images = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            if return_intermediates:
                return images, trajectory_xt, trajectory_x0, timesteps
            return (images,)
        if not return_intermediates:
            return AnalyticPipelineOutput(images=images)
        return AnalyticPipelineOutput(
            images=images, trajectory_xt=trajectory_xt, trajectory_x0=trajectory_x0, timesteps=timesteps
        )

    def _scale_model_input(self, latents: torch.Tensor, t) -> torch.Tensor:
        # Flow-matching schedulers have no `scale_model_input`: their model input is the sample itself.
        if hasattr(self.scheduler, "scale_model_input"):
            return self.scheduler.scale_model_input(latents, t)
        return latents

    def _postprocess(self, latents: torch.Tensor, output_type: str):
        if output_type == "latent":
            return latents
        images = (latents / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return images
        images = images.cpu().permute(0, 2, 3, 1).float().numpy()
        if output_type == "np":
            return images
        return self.numpy_to_pil(images)
