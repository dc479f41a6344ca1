"""R^2 and MSE of a prediction against a reference, per sample and per step of a trajectory.

Per sample, with the reference (e.g. a trained network's x0_hat) as target and D = C * H * W values::

    MSE = 1/D * sum_d (pred_d - target_d)^2
    R^2 = 1 - sum_d (pred_d - target_d)^2 / (Var(target) * D),   Var(target) = 1/D * sum_d (target_d - mean(target))^2
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def _flatten_pair(pred: torch.Tensor, target: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if pred.shape != target.shape:
        raise ValueError(
            f"`pred` and `target` must have the same shape, got {list(pred.shape)} and {list(target.shape)}."
        )
    if pred.ndim < 2:
        raise ValueError(
            f"`pred` and `target` must be batches [B, ...] of at least 2 dimensions, got {list(pred.shape)}."
        )
    return pred.reshape(len(pred), -1).double(), target.reshape(len(target), -1).double()


def mse_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""
    Mean squared error per sample, `1/D * sum_d (pred_d - target_d)^2`.

    Args:
        pred (`torch.Tensor` of shape `(B, ...)`): the prediction (e.g. an analytic denoiser's x0_hat).
        target (`torch.Tensor` of the same shape): the reference (e.g. the trained network's x0_hat).

    Returns:
        `torch.Tensor`: float64 `[B]`, on the inputs' device.
    """
    pred, target = _flatten_pair(pred, target)
    return (pred - target).pow(2).mean(dim=1)


def r2_score(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    r"""
    Coefficient of determination per sample, `1 - SS_res / (Var(target) * D)` with `SS_res = sum_d (pred_d -
    target_d)^2` and `Var(target)` the (population, 1/D) variance of that sample's D target values. 1 means equal,
    0 means no better than the target's own mean, and it is negative for worse. A sample whose target is constant
    has R^2 = 1 if `pred` equals it and NaN otherwise (0/0 is not a score).

    Args:
        pred (`torch.Tensor` of shape `(B, ...)`): the prediction.
        target (`torch.Tensor` of the same shape): the reference whose variance normalises the error.

    Returns:
        `torch.Tensor`: float64 `[B]`, on the inputs' device.
    """
    pred, target = _flatten_pair(pred, target)
    ss_res = (pred - target).pow(2).sum(dim=1)  # [B]
    ss_tot = (target - target.mean(dim=1, keepdim=True)).pow(2).sum(dim=1)  # Var(target) * D   [B]
    r2 = 1.0 - ss_res / ss_tot.where(ss_tot > 0, torch.ones_like(ss_tot))
    constant = ss_tot == 0
    return torch.where(constant, torch.where(ss_res == 0, 1.0, float("nan")).to(r2), r2)


@dataclass
class StepScores:
    """
    Scores of a prediction against a reference at every step of a trajectory.

    Args:
        timesteps (`list[int]`): `[S]`.
        r2 (`torch.Tensor`): float64 `[S, N]`, per step and sample ([`r2_score`]).
        mse (`torch.Tensor`): float64 `[S, N]` ([`mse_score`]).
        x0 (`torch.Tensor`, *optional*): the scored predictions, `[S, N, C, H, W]`.
    """

    timesteps: list[int]
    r2: torch.Tensor
    mse: torch.Tensor
    x0: torch.Tensor | None = None

    def summary(self) -> dict:
        """Per-step means and standard deviations over samples (NaN scores of constant targets left out), as lists."""
        r2 = self.r2
        valid = ~torch.isnan(r2)
        count = valid.sum(dim=1).clamp(min=1)
        r2_mean = torch.where(valid, r2, 0.0).sum(dim=1) / count
        r2_std = (torch.where(valid, r2 - r2_mean[:, None], 0.0).pow(2).sum(dim=1) / count).sqrt()
        return {
            "timesteps": list(self.timesteps),
            "r2_mean": r2_mean.tolist(),
            "r2_std": r2_std.tolist(),
            "mse_mean": self.mse.mean(dim=1).tolist(),
            "mse_std": self.mse.std(dim=1, unbiased=False).tolist(),
        }


def score_steps(pred_x0: torch.Tensor, target_x0: torch.Tensor, timesteps: list[int], keep: bool = True) -> StepScores:
    """R^2 and MSE of `pred_x0` against `target_x0`, both `[S, N, C, H, W]`, at every step (`keep`: store `pred_x0`)."""
    if pred_x0.shape != target_x0.shape:
        raise ValueError(f"Predictions {list(pred_x0.shape)} and targets {list(target_x0.shape)} differ in shape.")
    r2 = torch.stack([r2_score(p, q) for p, q in zip(pred_x0, target_x0)])  # [S, N]
    mse = torch.stack([mse_score(p, q) for p, q in zip(pred_x0, target_x0)])  # [S, N]
    return StepScores(list(timesteps), r2, mse, pred_x0 if keep else None)
