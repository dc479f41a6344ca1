"""One generator per image: image i of a run with seed s draws all its randomness from a generator seeded by (s, i),
so an image does not depend on the batch it is generated in or on the number of processes."""

from __future__ import annotations

import numpy as np
import torch


def seed_for_index(seed: int, index: int) -> int:
    """A 63-bit seed mixed from `(seed, index)` with numpy's SeedSequence (neighbouring indices are uncorrelated)."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, np.uint32)
    return (int(state[0]) << 31) ^ int(state[1])


def generator_for_index(seed: int, index: int, device: torch.device | str = "cpu") -> torch.Generator:
    """The generator of image `index` in a run seeded with `seed`."""
    return torch.Generator(device=device).manual_seed(seed_for_index(seed, index))


def generators_for_indices(seed: int, indices, device: torch.device | str = "cpu") -> list[torch.Generator]:
    """One generator per global image index."""
    return [generator_for_index(seed, index, device) for index in indices]
