"""Fixtures of the distributed tests: tiny fitted pipelines saved as folders."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def wiener_dir(tmp_path_factory) -> str:
    """A Wiener pipeline fitted on digits, saved as a folder."""
    import diffusers_analytic as da

    path = str(tmp_path_factory.mktemp("pipelines") / "wiener-digits")
    denoiser = da.WienerDenoiser.from_dataset(da.load_builtin("digits"), show_progress=False)
    da.AnalyticDDIMPipeline(unet=denoiser).save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def optimal_dir(tmp_path_factory) -> str:
    """An exact optimal pipeline over 301 digits (uint8), saved as a folder."""
    import diffusers_analytic as da

    from . import dp_cases

    path = str(tmp_path_factory.mktemp("pipelines") / "optimal-digits")
    denoiser = da.OptimalDenoiser.from_dataset(dp_cases.digits_images(), chunk_size=64, show_progress=False)
    da.AnalyticDDIMPipeline(unet=denoiser).save_pretrained(path)
    return path
