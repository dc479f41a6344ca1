"""Shared fixtures: small real data sets (built into scikit-learn / scikit-image) and Gaussian data."""

import os

import pytest
import torch

# The Hub is unreachable in tests; everything loads from local folders or a prepared cache.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
torch.set_num_threads(min(2, torch.get_num_threads()))


def pytest_addoption(parser):
    parser.addoption(
        "--device",
        default="cpu",
        help="torch device for the device tests (tests/test_devices.py), e.g. cuda or cuda:1; default cpu",
    )


@pytest.fixture(scope="session")
def device(request) -> torch.device:
    """The device the device tests run on (`--device`); an unavailable one stops the run with a clear message."""
    device = torch.device(request.config.getoption("--device"))
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise pytest.UsageError(f"--device {device} was asked for but this machine has no such CUDA device.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise pytest.UsageError(f"--device must be cpu, cuda[:N] or mps, got {device}.")
    return device


@pytest.fixture(scope="session")
def digits():
    from diffusers_analytic import load_builtin

    return load_builtin("digits")


@pytest.fixture(scope="session")
def digits_small(digits):
    """300 digits with labels: enough for every method, fast to fit."""
    from diffusers_analytic import ImageSet

    return ImageSet(digits.images[:300].clone(), digits.labels[:300].clone(), "digits300")


@pytest.fixture(scope="session")
def machines(digits):
    """For the calibration tests: an ELS machine with a known patch-size schedule (k = 1 at low noise, 3 in the middle,
    5 at high noise) playing the trained network, and one with k = 7 to calibrate against it (8x8 digits)."""
    from diffusers_analytic import EquivariantLocalScoreDenoiser

    images = digits.images[:40]
    trained = EquivariantLocalScoreDenoiser.from_dataset(images, patch_size_schedule=[[1.5, 1], [-2.0, 3], [-5.0, 5]])
    machine = EquivariantLocalScoreDenoiser.from_dataset(images, patch_size_schedule=7)
    return trained, machine
