from .denoiser_equivariant_local_score import EquivariantLocalScoreDenoiser
from .denoiser_local_score import LocalScoreDenoiser
from .denoiser_nearest import NearestDatasetDenoiser
from .denoiser_optimal import OptimalDenoiser
from .denoiser_pca_locality import PCALocalityDenoiser
from .denoiser_smoothed_cfdm import SmoothedCFDMDenoiser
from .denoiser_wiener import WienerDenoiser
from .modeling_analytic import AnalyticDenoiserMixin, AnalyticDenoiserOutput

__all__ = [
    "AnalyticDenoiserMixin",
    "AnalyticDenoiserOutput",
    "EquivariantLocalScoreDenoiser",
    "LocalScoreDenoiser",
    "NearestDatasetDenoiser",
    "OptimalDenoiser",
    "PCALocalityDenoiser",
    "SmoothedCFDMDenoiser",
    "WienerDenoiser",
]
