"""Method names -> denoiser classes, for the CLI and the Hub configs. A literal dict: nothing registers itself."""

from __future__ import annotations

from .models.denoiser_equivariant_local_score import EquivariantLocalScoreDenoiser
from .models.denoiser_local_score import LocalScoreDenoiser
from .models.denoiser_nearest import NearestDatasetDenoiser
from .models.denoiser_optimal import OptimalDenoiser
from .models.denoiser_pca_locality import PCALocalityDenoiser
from .models.denoiser_smoothed_cfdm import SmoothedCFDMDenoiser
from .models.denoiser_wiener import WienerDenoiser

DENOISERS = {
    "wiener": WienerDenoiser,
    "ls": LocalScoreDenoiser,
    "els": EquivariantLocalScoreDenoiser,
    "optimal": OptimalDenoiser,
    "scfdm": SmoothedCFDMDenoiser,
    "nearest_dataset": NearestDatasetDenoiser,
    "pca_locality": PCALocalityDenoiser,
}


def get_denoiser_class(method: str):
    """The denoiser class of a method name such as `"wiener"`; a ValueError lists the known names otherwise."""
    try:
        return DENOISERS[method]
    except KeyError:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(DENOISERS)}.") from None
