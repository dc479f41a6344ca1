"""Reading the trained pipeline to compare with (used by `compare` and `calibrate`)."""

from __future__ import annotations

import os

from diffusers import DiffusionPipeline

from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline
from ..saving import read_model_index

# The `from_pretrained` keywords that also say where model_index.json is.
_INDEX_KEYWORDS = ("revision", "cache_dir", "token", "local_files_only")


def load_trained(source: str | os.PathLike, **kwargs):
    """
    `(unet, scheduler)` of a trained diffusers pipeline folder or Hub repo id. An analytic pipeline works too (its
    denoiser plays the trained network), which compares two analytic methods. `kwargs` go to `from_pretrained`
    (`revision`, `local_files_only`, ...).
    """
    index = read_model_index(source, **{k: kwargs[k] for k in _INDEX_KEYWORDS if k in kwargs}) or {}
    analytic = index.get("_class_name") == AnalyticDDIMPipeline.__name__
    pipeline = (AnalyticDDIMPipeline if analytic else DiffusionPipeline).from_pretrained(source, **kwargs)
    unet, scheduler = getattr(pipeline, "unet", None), getattr(pipeline, "scheduler", None)
    if unet is None or scheduler is None:
        raise ValueError(
            f"{source} loads as a {type(pipeline).__name__} without a `unet` and a `scheduler`; a trained model to "
            "compare with needs both (e.g. a DDPMPipeline or DDIMPipeline)."
        )
    return unet, scheduler
