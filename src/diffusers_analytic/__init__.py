"""diffusers-analytic: training-free (analytic) diffusion denoisers that behave like a trained UNet in diffusers.

The public names are imported on first use (PEP 562), so that `diffusers-analytic --help` and other light imports of
the package do not load torch and diffusers.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> the module (relative to this package) that defines it
_LAZY_NAMES = {
    "AnalyticDDIMPipeline": ".pipelines.pipeline_analytic_ddim",
    "AnalyticDenoiserMixin": ".models.modeling_analytic",
    "AnalyticDenoiserOutput": ".models.modeling_analytic",
    "AnalyticPipelineOutput": ".pipelines.pipeline_analytic_ddim",
    "DENOISERS": ".registry",
    "EquivariantLocalScoreDenoiser": ".models.denoiser_equivariant_local_score",
    "ImageSet": ".data",
    "LocalScoreDenoiser": ".models.denoiser_local_score",
    "NearestDatasetDenoiser": ".models.denoiser_nearest",
    "OptimalDenoiser": ".models.denoiser_optimal",
    "SmoothedCFDMDenoiser": ".models.denoiser_smoothed_cfdm",
    "PCALocalityDenoiser": ".models.denoiser_pca_locality",
    "WienerDenoiser": ".models.denoiser_wiener",
    "get_denoiser_class": ".registry",
    "iter_image_batches": ".data",
    "load_builtin": ".data",
    "load_image_dataset": ".data",
}

__all__ = [
    "AnalyticDDIMPipeline",
    "AnalyticDenoiserMixin",
    "AnalyticDenoiserOutput",
    "AnalyticPipelineOutput",
    "DENOISERS",
    "EquivariantLocalScoreDenoiser",
    "ImageSet",
    "LocalScoreDenoiser",
    "NearestDatasetDenoiser",
    "OptimalDenoiser",
    "SmoothedCFDMDenoiser",
    "PCALocalityDenoiser",
    "WienerDenoiser",
    "get_denoiser_class",
    "iter_image_batches",
    "load_builtin",
    "load_image_dataset",
]


def __getattr__(name: str):
    module = _LAZY_NAMES.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
