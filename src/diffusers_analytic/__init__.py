"""diffusers-analytic: training-free (analytic) diffusion denoisers that behave like a trained UNet in diffusers."""

__version__ = "0.1.0"

from .data import ImageSet, iter_image_batches, load_builtin, load_image_dataset
from .models.denoiser_equivariant_local_score import EquivariantLocalScoreDenoiser
from .models.denoiser_local_score import LocalScoreDenoiser
from .models.denoiser_nearest import NearestDatasetDenoiser
from .models.denoiser_optimal import OptimalDenoiser
from .models.denoiser_pca_locality import PCALocalityDenoiser
from .models.denoiser_smoothed_cfdm import SmoothedCFDMDenoiser
from .models.denoiser_wiener import WienerDenoiser
from .models.modeling_analytic import AnalyticDenoiserMixin, AnalyticDenoiserOutput
from .pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline, AnalyticPipelineOutput
from .registry import DENOISERS, get_denoiser_class

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
