"""Scheduler names for the CLI: a diffusers class name or a short alias -> a scheduler matching a denoiser."""

from __future__ import annotations

import diffusers

# alias -> (class name, extra config)
SCHEDULER_ALIASES = {
    "ddim": ("DDIMScheduler", {}),
    "ddpm": ("DDPMScheduler", {}),
    "pndm": ("PNDMScheduler", {}),
    "lms": ("LMSDiscreteScheduler", {}),
    "euler": ("EulerDiscreteScheduler", {}),
    "euler_a": ("EulerAncestralDiscreteScheduler", {}),
    "heun": ("HeunDiscreteScheduler", {}),
    "dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "dpm++3m": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++", "solver_order": 3}),
    "sde-dpm++2m": ("DPMSolverMultistepScheduler", {"algorithm_type": "sde-dpmsolver++", "solver_order": 2}),
    "dpm-single": ("DPMSolverSinglestepScheduler", {}),
    "kdpm2": ("KDPM2DiscreteScheduler", {}),
    "kdpm2_a": ("KDPM2AncestralDiscreteScheduler", {}),
    "deis": ("DEISMultistepScheduler", {}),
    "unipc": ("UniPCMultistepScheduler", {}),
    "sa-solver": ("SASolverScheduler", {}),
}


def scheduler_class_and_config(name: str):
    """`(scheduler class, extra config)` for an alias (`"dpm++2m"`) or a diffusers class name (`"UniPCMultistepScheduler"`)."""
    key = name.lower()
    if key in SCHEDULER_ALIASES:
        class_name, extra = SCHEDULER_ALIASES[key]
        return getattr(diffusers, class_name), dict(extra)
    scheduler_class = getattr(diffusers, name, None)
    if scheduler_class is None or not name.endswith("Scheduler"):
        raise ValueError(
            f"Unknown scheduler {name!r}; use a diffusers scheduler class name or one of {sorted(SCHEDULER_ALIASES)}."
        )
    return scheduler_class, {}


def make_scheduler(name: str, base_config, karras: bool = False, **overrides):
    """
    A scheduler named `name`, built with `from_config` from `base_config` (a pipeline's current scheduler config, so
    the training schedule and prediction type carry over), plus `use_karras_sigmas=True` with `karras`.
    """
    scheduler_class, extra = scheduler_class_and_config(name)
    if karras:
        extra["use_karras_sigmas"] = True
    return scheduler_class.from_config(base_config, **extra, **overrides)
