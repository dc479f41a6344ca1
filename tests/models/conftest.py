"""Fixtures shared by the denoiser tests."""

import pytest
import torch

from diffusers_analytic.models import functional


@pytest.fixture
def split_over_threads(monkeypatch):
    """Splits digits (N = 1797) into 3 ranges of ~600 images, one per worker thread, as a CPU does for large N."""
    monkeypatch.setattr(functional, "MIN_IMAGES_PER_THREAD", 500)
    threads = torch.get_num_threads()
    torch.set_num_threads(3)
    ranges = []
    image_ranges = functional._image_ranges
    monkeypatch.setattr(functional, "_image_ranges", lambda *a: ranges.append(image_ranges(*a)) or ranges[-1])
    yield ranges
    torch.set_num_threads(threads)
