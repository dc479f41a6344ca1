"""Fixtures of the evaluation tests: a Wiener denoiser of the digits, which also plays the trained network."""

import pytest

from diffusers_analytic import WienerDenoiser


@pytest.fixture(scope="session")
def wiener(digits):
    return WienerDenoiser.from_dataset(digits.images, show_progress=False)
