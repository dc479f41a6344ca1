r"""The streamed (online) softmax: exact softmax-weighted sums over values that arrive in chunks.

For logits l_i and values v_i a state keeps the running max m, the running sum s = sum_i exp(l_i - m) and the running
weighted sum acc = sum_i exp(l_i - m) v_i; at the end acc / s = sum_i softmax(l)_i v_i, equal to the one-shot
softmax to floating-point rounding whatever the chunking (Milakov & Gimelshein 2018). States over disjoint sets of
values combine exactly (`merge`, `merge_leading`, and across processes `kernels.reductions`), which is how blocks of
images on one CPU and shards of images on several processes are put together.

One underflow rule for every softmax in the package: a weight exp(l - m) at most e^-86 of its row's reference m is
exactly 0 (`exp_weights_`). Its effect on a result is below N e^-86 relative, far under float32 rounding, and it
keeps subnormal numbers out of the exponentials and GEMMs, where CPUs take slow paths.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

# exp(x) for x <= WEIGHT_LOG_FLOOR is taken as 0. Inputs are first raised to EXP_CLAMP (e^-87 = 1.6e-38 is still a
# normal float32), so the exponential never meets the very negative arguments that a CPU evaluates slowly.
WEIGHT_LOG_FLOOR = -86.0
EXP_CLAMP = -87.0
_WEIGHT_FLOOR = math.exp(WEIGHT_LOG_FLOOR)


def exp_weights_(shifted_logits: torch.Tensor) -> torch.Tensor:
    """
    In place: `exp(l - m)` for `shifted_logits` = l - m, with the package's underflow rule (a weight <= e^-86 is
    exactly 0). Returns the tensor.
    """
    shifted_logits.clamp_(min=EXP_CLAMP).exp_()
    return torch.nn.functional.threshold_(shifted_logits, _WEIGHT_FLOOR, 0.0)


def expand_like(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """`values` `[*S]` reshaped to broadcast against `like` `[*S, *V]`."""
    return values.reshape(*values.shape, *([1] * (like.ndim - values.ndim)))


def _finite_or(values: torch.Tensor, fallback: torch.Tensor) -> torch.Tensor:
    return torch.where(torch.isfinite(values), values, fallback)


class OnlineSoftmax:
    r"""
    The state of one streamed softmax per row. Shapes: logits `[*S, n]` per chunk (`S` the shape of the rows, e.g.
    `[B]` or `[B, P]`), weighted sum `[*S, *V]` (`V` may be empty).

    A row that has seen no finite logit has max -inf, sum 0 and weighted sum 0: it contributes nothing to a merge.
    """

    def __init__(self):
        self.max: torch.Tensor | None = None  # m    [*S]
        self.sum: torch.Tensor | None = None  # s    [*S]
        self.acc: torch.Tensor | None = None  # acc  [*S, *V]

    @classmethod
    def empty(cls, rows_shape: tuple, value_shape: tuple, device=None) -> OnlineSoftmax:
        """A state of rows that have seen nothing (max -inf), e.g. a shard without an image of a requested class."""
        state = cls()
        state.max = torch.full(tuple(rows_shape), float("-inf"), device=device)
        state.sum = torch.zeros(tuple(rows_shape), device=device)
        state.acc = torch.zeros((*rows_shape, *value_shape), device=device)
        return state

    def update(self, logits: torch.Tensor, weighted_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """
        Adds one chunk: `logits` `[*S, n]`; `weighted_sum(w)` maps the chunk's weights `w` `[*S, n]` (exp of the
        logits less the new running max, with the underflow rule) to `sum_i w_i v_i` `[*S, *V]`.
        """
        chunk_max = logits.amax(dim=-1)
        new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
        safe_max = _finite_or(new_max, torch.zeros_like(new_max))  # (-inf rows must not give inf - inf)
        weights = exp_weights_(logits - safe_max.unsqueeze(-1))  # [*S, n]
        chunk_sum = weights.sum(dim=-1)
        chunk_acc = weighted_sum(weights)
        if self.max is None:
            self.max, self.sum, self.acc = new_max, chunk_sum, chunk_acc
            return
        scale = torch.exp(_finite_or(self.max, safe_max) - safe_max)  # exp(m_old - m_new)
        self.sum = self.sum * scale + chunk_sum
        self.acc = self.acc * expand_like(scale, self.acc) + chunk_acc
        self.max = new_max

    def merge(self, other: OnlineSoftmax) -> None:
        """Combines the state of a disjoint set of chunks into this one (exact)."""
        if other.max is None:
            return
        if self.max is None:
            self.max, self.sum, self.acc = other.max, other.sum, other.acc
            return
        stacked = OnlineSoftmax()
        stacked.max = torch.stack([self.max, other.max])
        stacked.sum = torch.stack([self.sum, other.sum])
        stacked.acc = torch.stack([self.acc, other.acc])
        merged = stacked.merge_leading()
        self.max, self.sum, self.acc = merged.max, merged.sum, merged.acc

    def merge_leading(self) -> OnlineSoftmax:
        r"""
        The state over all G entries of the leading axis of the rows, `[G, *S]` -> `[*S]` (exact):

            m = max_g m_g,   s = sum_g exp(m_g - m) s_g,   acc = sum_g exp(m_g - m) acc_g
        """
        new_max = self.max.amax(dim=0)
        safe_max = _finite_or(new_max, torch.zeros_like(new_max))
        scale = torch.exp(_finite_or(self.max, safe_max.expand_as(self.max)) - safe_max)  # [G, *S]
        merged = OnlineSoftmax()
        merged.max = new_max
        merged.sum = (self.sum * scale).sum(dim=0)
        merged.acc = (self.acc * expand_like(scale, self.acc)).sum(dim=0)
        return merged

    def result(self) -> torch.Tensor:
        """acc / s: the softmax-weighted sum over every chunk seen."""
        if self.max is None:
            raise ValueError("OnlineSoftmax.result() called before any chunk was added.")
        return self.acc / expand_like(self.sum, self.acc)
