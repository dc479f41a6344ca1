"""R^2 and MSE per sample (checked by hand and against scikit-learn) and per step (diffusers_analytic.evaluation.scores)."""

import pytest
import torch
from sklearn.metrics import mean_squared_error
from sklearn.metrics import r2_score as sklearn_r2

from diffusers_analytic.evaluation import StepScores, mse_score, r2_score, score_steps


def test_r2_and_mse_by_hand():
    target = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.0, 0.0, 2.0, 2.0]]).reshape(2, 1, 2, 2)
    pred = torch.tensor([[1.0, 2.0, 3.0, 5.0], [1.0, 1.0, 1.0, 1.0]]).reshape(2, 1, 2, 2)
    # sample 0: SS_res = 1, mean 2.5, Var * D = 2.25 + 0.25 + 0.25 + 2.25 = 5  ->  R^2 = 0.8, MSE = 1/4
    # sample 1: SS_res = 4, mean 1,   Var * D = 4                            ->  R^2 = 0,   MSE = 1
    assert r2_score(pred, target).tolist() == pytest.approx([0.8, 0.0], abs=1e-12)
    assert mse_score(pred, target).tolist() == pytest.approx([0.25, 1.0], abs=1e-12)
    # Not symmetric: the variance is the target's.
    assert r2_score(target, pred)[0].item() != pytest.approx(0.8)
    assert r2_score(pred, target).dtype == torch.float64


def test_r2_and_mse_match_sklearn_per_sample():
    generator = torch.Generator().manual_seed(0)
    target = torch.randn(5, 3, 4, 4, generator=generator)
    pred = target + 0.5 * torch.randn(5, 3, 4, 4, generator=generator)
    ours_r2, ours_mse = r2_score(pred, target), mse_score(pred, target)
    for i in range(5):
        y, p = target[i].reshape(-1).double().numpy(), pred[i].reshape(-1).double().numpy()
        assert ours_r2[i].item() == pytest.approx(sklearn_r2(y, p), rel=1e-12)
        assert ours_mse[i].item() == pytest.approx(mean_squared_error(y, p), rel=1e-12)


def test_r2_of_identical_and_constant_targets():
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(r2_score(x, x), torch.ones(3, dtype=torch.float64))
    assert torch.equal(mse_score(x, x), torch.zeros(3, dtype=torch.float64))
    constant = torch.full((2, 1, 2, 2), 0.5)
    r2 = r2_score(torch.stack([constant[0], constant[1] + 1]), constant)
    assert r2[0].item() == 1.0 and torch.isnan(r2[1])


def test_metrics_reject_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        r2_score(torch.zeros(2, 4), torch.zeros(2, 5))
    with pytest.raises(ValueError, match="same shape"):
        mse_score(torch.zeros(2, 4), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        score_steps(torch.zeros(2, 3, 1, 2, 2), torch.zeros(2, 4, 1, 2, 2), [1, 0])


def test_score_steps_and_summary():
    generator = torch.Generator().manual_seed(3)
    target = torch.randn(2, 4, 1, 3, 3, generator=generator)  # [S, N, C, H, W]
    pred = target + 0.1 * torch.randn(2, 4, 1, 3, 3, generator=generator)
    scores = score_steps(pred, target, [500, 0])
    assert scores.r2.shape == scores.mse.shape == (2, 4) and scores.x0 is pred
    torch.testing.assert_close(scores.r2[1], r2_score(pred[1], target[1]))
    assert score_steps(pred, target, [500, 0], keep=False).x0 is None
    summary = scores.summary()
    assert summary["timesteps"] == [500, 0]
    assert summary["r2_mean"] == pytest.approx(scores.r2.mean(dim=1).tolist())
    assert summary["mse_std"] == pytest.approx(scores.mse.std(dim=1, unbiased=False).tolist())
    # NaN scores (constant targets) are left out of the mean and standard deviation.
    r2 = torch.tensor([[0.5, float("nan"), 0.7]], dtype=torch.float64)
    summary = StepScores([0], r2, torch.zeros(1, 3, dtype=torch.float64)).summary()
    assert summary["r2_mean"] == pytest.approx([0.6]) and summary["r2_std"] == pytest.approx([0.1])
