"""R^2 / MSE metrics, x0 from a trained network's output, and trajectory comparisons (diffusers_analytic.evaluation)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler
from sklearn.metrics import mean_squared_error
from sklearn.metrics import r2_score as sklearn_r2

from diffusers_analytic import WienerDenoiser, load_builtin
from diffusers_analytic.evaluation import (
    compare_with_trained,
    ddim_scheduler_like,
    denoiser_predictor,
    evaluate_on_trajectory,
    mse_score,
    r2_score,
    sample_trajectory,
    x0_from_model_output,
)


@pytest.fixture(scope="module")
def wiener():
    return WienerDenoiser.from_dataset(load_builtin("digits").images, show_progress=False)


# ---------------------------------------------------------------------------------------------- metrics
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


# ---------------------------------------------------------------------------------------------- x0 from model output
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_x0_from_model_output_matches_ddim_step(prediction_type):
    generator = torch.Generator().manual_seed(1)
    scheduler = DDIMScheduler(prediction_type=prediction_type, clip_sample=False)
    scheduler.set_timesteps(10)
    sample, output = torch.randn(2, 1, 4, 4, generator=generator), torch.randn(2, 1, 4, 4, generator=generator)
    for t in (int(scheduler.timesteps[0]), 500, 0):
        expected = scheduler.step(output, t, sample).pred_original_sample
        ours = x0_from_model_output(output, sample, scheduler.alphas_cumprod[t], prediction_type)
        torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)


def test_x0_from_model_output_inverts_the_forward_process():
    generator = torch.Generator().manual_seed(2)
    x0, eps = (
        torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64),
        torch.randn(3, 1, 4, 4, generator=generator, dtype=torch.float64),
    )
    a = torch.tensor([0.9, 0.5, 0.01], dtype=torch.float64)[:, None, None, None]
    x_t = a.sqrt() * x0 + (1 - a).sqrt() * eps
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    torch.testing.assert_close(x0_from_model_output(eps, x_t, a.reshape(-1), "epsilon"), x0)
    torch.testing.assert_close(x0_from_model_output(v, x_t, a.reshape(-1), "v_prediction"), x0)
    with pytest.raises(ValueError, match="prediction_type"):
        x0_from_model_output(v, x_t, a.reshape(-1), "score")


# ---------------------------------------------------------------------------------------------- trajectories
def test_trajectory_does_not_depend_on_batch_size(wiener):
    scheduler = ddim_scheduler_like(DDPMScheduler())
    kwargs = dict(sample_shape=wiener.sample_shape, num_samples=5, num_inference_steps=3, seed=7, show_progress=False)
    whole = sample_trajectory(denoiser_predictor(wiener), scheduler, batch_size=5, **kwargs)
    split = sample_trajectory(denoiser_predictor(wiener), scheduler, batch_size=2, **kwargs)
    assert whole.xt.shape == (3, 5, 1, 8, 8) and whole.timesteps == split.timesteps
    torch.testing.assert_close(whole.xt, split.xt)
    torch.testing.assert_close(whole.final, split.final)
    other_seed = sample_trajectory(denoiser_predictor(wiener), scheduler, batch_size=5, **{**kwargs, "seed": 8})
    assert not torch.allclose(whole.xt[0], other_seed.xt[0])


def test_single_step_scores_are_the_metrics_of_the_predictions(wiener):
    scheduler = ddim_scheduler_like(DDPMScheduler())
    trajectory = sample_trajectory(
        denoiser_predictor(wiener), scheduler, wiener.sample_shape, 4, num_inference_steps=3, show_progress=False
    )

    def blurred(x_t, t):  # another "denoiser": the Wiener x0 shifted by a constant
        return wiener.denoise(x_t, t) + 0.1

    scores = evaluate_on_trajectory(blurred, trajectory, batch_size=3, show_progress=False)
    for step, t in enumerate(trajectory.timesteps):
        pred = wiener.denoise(trajectory.xt[step], t).double() + 0.1
        target = trajectory.x0[step].double()
        torch.testing.assert_close(scores.mse[step], torch.full((4,), 0.01, dtype=torch.float64), rtol=1e-4, atol=0)
        expected = 1 - ((pred - target) ** 2).sum((1, 2, 3)) / (
            (target - target.mean((1, 2, 3), keepdim=True)) ** 2
        ).sum((1, 2, 3))
        torch.testing.assert_close(scores.r2[step], expected, rtol=1e-5, atol=1e-6)


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


def test_the_comparison_measures_a_different_model(wiener):
    # A Wiener denoiser fitted on 32 images only: clearly not the same model, R^2 < 1 at the noisy steps.
    other = WienerDenoiser.from_dataset(load_builtin("digits").images[:32], show_progress=False)
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
