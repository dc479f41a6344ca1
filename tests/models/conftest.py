"""Fixtures shared by the denoiser tests."""

import pytest

from diffusers_analytic.kernels import empirical_cpu


@pytest.fixture
def split_into_blocks(monkeypatch):
    """
    Makes the CPU path view digits (N = 1797) as `blocks` blocks side by side, as it does on a machine with that many
    torch threads for large N (the thread count itself is not touched). Returns `set_blocks(blocks)` and the list of
    layouts `[(start, G, n)]` used, one per call.
    """
    layouts_seen = []
    block_layouts = empirical_cpu._block_layouts
    monkeypatch.setattr(
        empirical_cpu, "_block_layouts", lambda *a: layouts_seen.append(block_layouts(*a)) or layouts_seen[-1]
    )

    def set_blocks(blocks):
        monkeypatch.setattr(
            empirical_cpu, "num_blocks", lambda n, batch: blocks if batch <= empirical_cpu.SMALL_BATCH else 1
        )
        return layouts_seen

    return set_blocks
