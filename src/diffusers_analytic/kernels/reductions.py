r"""Exact reductions across processes: what several processes, each holding part of the stored images, combine so
that every process gets the result over all images.

Collectives go through a communicator with one method, `all_reduce(tensor, op) -> tensor` (`op` is `"sum"`, `"max"`
or `"min"`); `diffusers_analytic.distributed.ProcessGroupCommunicator` is the one over `torch.distributed`, tests may
pass their own.
"""

from __future__ import annotations

from typing import Protocol

import torch

from .online_softmax import OnlineSoftmax, expand_like

REDUCE_OPS = ("sum", "max", "min")


class Communicator(Protocol):
    """What the reductions need: this process's rank, the number of processes and an all-reduce."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """The elementwise `op` (`"sum"`, `"max"`, `"min"`) of `tensor` over all processes, on `tensor`'s device."""
        ...


def all_reduce_online_softmaxes(
    states: list[OnlineSoftmax], communicator: Communicator, shapes: list | None = None, device=None
) -> list[OnlineSoftmax]:
    r"""
    Combines each process's partial [`OnlineSoftmax`] states (each over its own images) into the states over all
    images, in place, packed into one MAX and one SUM all-reduce whatever the number of states. With process r's
    running max m_r, sum s_r and weighted sum acc_r:

        m = max_r m_r                                                   (all-reduce MAX)
        s = sum_r exp(m_r - m) s_r,   acc = sum_r exp(m_r - m) acc_r     (all-reduce SUM)

    the rule `OnlineSoftmax.merge` applies to two states, so the result equals one process's to float32 rounding.

    Args:
        states (`list[OnlineSoftmax]`): this process's states, e.g. one per tile of output pixels.
        communicator: see the module docstring.
        shapes (`list`, *optional*): `(rows_shape, value_shape)` per state; needed for a state that may be empty
            (no chunk seen, e.g. no image of the requested class in this shard), which then contributes nothing.
        device (*optional*): where an empty state's tensors are made.
    """
    for k, state in enumerate(states):
        if state.max is None:
            if shapes is None or shapes[k] is None:
                raise ValueError(
                    "This process's softmax state is empty (its shard had no matching image); pass its "
                    "`(rows_shape, value_shape)` in `shapes` so that it can take part in the reduction."
                )
            empty = OnlineSoftmax.empty(*shapes[k], device=device)
            state.max, state.sum, state.acc = empty.max, empty.sum, empty.acc
    # 1. the common running max of every row
    global_max = communicator.all_reduce(torch.cat([state.max.reshape(-1) for state in states]), "max")
    global_maxes = global_max.split([state.max.numel() for state in states])
    # 2. rescale each partial sum to it: exp(m_r - m), 0 where this process saw nothing (m_r = -inf)
    packed = []
    for state, state_global in zip(states, global_maxes):
        safe_global = torch.where(torch.isfinite(state_global), state_global, torch.zeros_like(state_global))
        scale = torch.exp(state.max.reshape(-1) - safe_global).reshape(state.max.shape)  # [*S]
        packed += [(state.sum * scale).reshape(-1), (state.acc * expand_like(scale, state.acc)).reshape(-1)]
    # 3. add the rescaled sums (one call for all states)
    summed = communicator.all_reduce(torch.cat(packed), "sum").split([part.numel() for part in packed])
    for k, (state, state_global) in enumerate(zip(states, global_maxes)):
        state.sum = summed[2 * k].reshape(state.sum.shape)
        state.acc = summed[2 * k + 1].reshape(state.acc.shape)
        state.max = state_global.reshape(state.max.shape)
    return states


def all_reduce_nearest(
    distances: torch.Tensor, indices: torch.Tensor, images: torch.Tensor, communicator: Communicator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    The global nearest neighbour from each process's own: per query b, the smallest distance over all processes,
    ties broken by the smallest global index (as `torch.argmin` does on one process), and that image.

        d* = min_r d_r                       (all-reduce MIN)
        i* = min { i_r : d_r = d* }          (all-reduce MIN)
        y* = sum_r [i_r = i*] y_r            (all-reduce SUM of one non-zero term: exact)

    Args:
        distances (`torch.Tensor` `[B]`): this process's best distance per query (+inf if it has no candidate).
        indices (`torch.Tensor` `[B]` int64): the *global* index of that image.
        images (`torch.Tensor` `[B, ...]`): that image.

    Returns:
        `(distances, indices, images)` of the global winners, the same on every process.
    """
    sentinel = torch.iinfo(torch.int64).max
    best = communicator.all_reduce(distances, "min")  # [B]
    indices = indices.to(torch.int64)
    candidates = torch.where(distances == best, indices, torch.full_like(indices, sentinel))
    winner = communicator.all_reduce(candidates, "min")  # [B]
    is_mine = (indices == winner).reshape(-1, *([1] * (images.ndim - 1)))
    winner_images = communicator.all_reduce(torch.where(is_mine, images, torch.zeros_like(images)), "sum")
    return best, winner, winner_images
