"""Shared fixtures: small real data sets (built into scikit-learn / scikit-image) and Gaussian data."""

import os

import pytest
import torch

# The Hub is unreachable in tests; everything loads from local folders or a prepared cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


@pytest.fixture(scope="session")
def digits():
    from diffusers_analytic import load_builtin

    return load_builtin("digits")


@pytest.fixture(scope="session")
def digits_small(digits):
    """300 digits with labels: enough for every method, fast to fit."""
    from diffusers_analytic import ImageSet

    return ImageSet(digits.images[:300].clone(), digits.labels[:300].clone(), "digits300")
