from .denoiser_pca_locality import PCALocalityDenoiser
from .denoiser_wiener import WienerDenoiser
from .modeling_analytic import AnalyticDenoiserMixin, AnalyticDenoiserOutput

__all__ = ["AnalyticDenoiserMixin", "AnalyticDenoiserOutput", "PCALocalityDenoiser", "WienerDenoiser"]
