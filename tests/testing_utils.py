"""Helpers shared by the tests (import as `from tests.testing_utils import ...`)."""

import contextlib
import logging

import torch
from diffusers import UNet2DModel


def random_gaussian(dim: int, seed: int, scale: float = 1.0):
    """A random mean and a random full-rank covariance (float64) of dimension `dim`."""
    g = torch.Generator().manual_seed(seed)
    mean = torch.randn(dim, generator=g, dtype=torch.float64) * 0.5 * scale
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    spectrum = torch.logspace(-2.5, 0.3, dim, dtype=torch.float64) * scale**2
    cov = basis @ torch.diag(spectrum) @ basis.T
    return mean, 0.5 * (cov + cov.T)


def sample_gaussian(mean, cov, n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    chol = torch.linalg.cholesky(cov)
    return mean + torch.randn(n, len(mean), generator=g, dtype=torch.float64) @ chol.T


def tiny_unet(seed: int = 0) -> UNet2DModel:
    """A small real `UNet2DModel` for 8x8 grey images (random weights from `seed`): the trained network of tests."""
    torch.manual_seed(seed)
    return UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )


@contextlib.contextmanager
def logged_warnings(logger_name: str):
    """The `logging.LogRecord`s of warnings (and worse) logged to `logger_name` inside the block, as a list."""
    records = []
    handler = logging.Handler(logging.WARNING)
    handler.emit = records.append
    logger = logging.getLogger(logger_name)
    logger.addHandler(handler)
    try:
        yield records
    finally:
        logger.removeHandler(handler)
