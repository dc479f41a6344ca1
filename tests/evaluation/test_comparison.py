"""Single-step and own-trajectory comparisons with a trained network (diffusers_analytic.evaluation.comparison)."""

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_analytic import WienerDenoiser
from diffusers_analytic.evaluation import (
    analytic_trajectory,
    compare_with_trained,
    ddim_scheduler_like,
    evaluate_on_trajectory,
)


def test_single_step_scores_are_the_metrics_of_the_predictions(wiener):
    scheduler = ddim_scheduler_like(DDPMScheduler())
    trajectory = analytic_trajectory(wiener, scheduler, num_samples=4, num_inference_steps=3, show_progress=False)

    def shifted(x_t, t):  # another "denoiser": the Wiener x0 shifted by a constant
        return wiener.denoise(x_t, t) + 0.1

    scores = evaluate_on_trajectory(shifted, trajectory, batch_size=3, show_progress=False)
    assert scores.timesteps == trajectory.timesteps and scores.x0.shape == trajectory.x0.shape
    for step, t in enumerate(trajectory.timesteps):
        pred = wiener.denoise(trajectory.xt[step], t).double() + 0.1
        target = trajectory.x0[step].double()
        torch.testing.assert_close(scores.mse[step], torch.full((4,), 0.01, dtype=torch.float64), rtol=1e-4, atol=0)
        expected = 1 - ((pred - target) ** 2).sum((1, 2, 3)) / (
            (target - target.mean((1, 2, 3), keepdim=True)) ** 2
        ).sum((1, 2, 3))
        torch.testing.assert_close(scores.r2[step], expected, rtol=1e-5, atol=1e-6)
    # The denoiser itself (its `denoise`) on its own trajectory: R^2 = 1.
    itself = evaluate_on_trajectory(wiener, trajectory, batch_size=3, show_progress=False)
    torch.testing.assert_close(itself.r2, torch.ones_like(itself.r2), rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="`denoise` method or be callable"):
        evaluate_on_trajectory(object(), trajectory, show_progress=False)


def test_a_model_compared_with_itself_has_r2_one(wiener):
    # The Wiener denoiser in the role of the trained network: called as `unet(x_t, t).sample` it returns epsilon,
    # which the comparison turns back into x0 with the scheduler's alphas_cumprod.
    result = compare_with_trained(
        wiener, wiener, DDPMScheduler(), num_samples=4, num_inference_steps=5, batch_size=3, show_progress=False
    )
    for scores in (result.single_step, result.own_trajectory, result.final):
        assert scores.r2.shape[1] == 4
        torch.testing.assert_close(scores.r2, torch.ones_like(scores.r2), rtol=0, atol=1e-4)
        assert scores.mse.max().item() < 1e-6
    summary = result.to_dict()
    assert summary["timesteps"] == [800, 600, 400, 200, 0]
    assert len(summary["single_step"]["r2_mean"]) == 5
    assert summary["final_sample"]["r2_mean"] == pytest.approx(1.0, abs=1e-4)
    assert summary["denoiser"] == summary["trained_model"] == "WienerDenoiser" and summary["num_samples"] == 4


def test_the_comparison_measures_a_different_model(wiener, digits):
    # A Wiener denoiser fitted on 32 images only: clearly not the same model, R^2 < 1 at the noisy steps.
    other = WienerDenoiser.from_dataset(digits.images[:32], show_progress=False)
    result = compare_with_trained(
        other, wiener, DDPMScheduler(), num_samples=4, num_inference_steps=3, show_progress=False
    )
    assert result.single_step.r2[0].mean() < 0.99
    assert torch.isfinite(result.single_step.r2).all() and torch.isfinite(result.own_trajectory.mse).all()


def test_schedule_mismatch_is_a_clear_error(wiener):
    with pytest.raises(ValueError, match="share one noise schedule.*squaredcos_cap_v2"):
        compare_with_trained(
            wiener,
            wiener,
            DDPMScheduler(beta_schedule="squaredcos_cap_v2"),
            num_samples=1,
            num_inference_steps=2,
            show_progress=False,
        )
    with pytest.raises(ValueError, match="share one noise schedule"):
        compare_with_trained(
            wiener,
            wiener,
            DDPMScheduler(num_train_timesteps=500),
            num_samples=1,
            num_inference_steps=2,
            show_progress=False,
        )


def test_shape_mismatch_is_a_clear_error(wiener):
    colour = WienerDenoiser(sample_size=8, in_channels=3)
    with pytest.raises(ValueError, match=r"shape \[3, 8, 8\].*\[1, 8, 8\]"):
        compare_with_trained(
            wiener, colour, DDPMScheduler(), num_samples=1, num_inference_steps=2, show_progress=False
        )
