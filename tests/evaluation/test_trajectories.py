"""Trajectories: x0 from a trained network's output, the trained DDIM loop and the analytic pipeline's trajectory
(diffusers_analytic.evaluation.trajectories)."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffusers_analytic import SmoothedCFDMDenoiser
from diffusers_analytic.evaluation import (
    analytic_trajectory,
    ddim_scheduler_like,
    trained_trajectory,
    x0_from_model_output,
)
from diffusers_analytic.utils.seeding import generators_for_indices


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


def test_x0_from_an_epsilon_prediction_stays_finite_at_zero_signal():
    x_t, eps = torch.ones(1, 1, 2, 2), torch.zeros(1, 1, 2, 2)
    assert torch.isfinite(x0_from_model_output(eps, x_t, 0.0, "epsilon")).all()


# ---------------------------------------------------------------------------------------------- trajectories
def former_loop(denoiser, scheduler, num_samples, num_inference_steps, seed, eta):
    """The sampling loop evaluation ran before the pipeline did it, in one batch: (x_t, x0_hat, final)."""
    generators = generators_for_indices(seed, range(num_samples))
    latents = torch.stack([torch.randn(denoiser.sample_shape, generator=g) for g in generators])
    latents = latents * scheduler.init_noise_sigma
    scheduler.set_timesteps(num_inference_steps)
    xt, x0 = [], []
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(latents, t)
        output = denoiser(model_input, t, generator=generators)
        xt.append(model_input)
        x0.append(output.pred_original_sample)
        latents = scheduler.step(output.sample, t, latents, eta=eta, generator=generators).prev_sample
    return torch.stack(xt), torch.stack(x0), latents


def test_the_analytic_trajectory_is_the_former_loop(digits):
    # A denoiser that draws noise and eta > 0: the denoiser's and the scheduler's randomness both come from (seed, i).
    denoiser = SmoothedCFDMDenoiser.from_dataset(digits.images[:100], num_noise=2, in_channels=1, sample_size=8)
    scheduler = ddim_scheduler_like(DDPMScheduler(), clip_sample=False)
    xt, x0, final = former_loop(denoiser, scheduler, num_samples=3, num_inference_steps=4, seed=5, eta=0.5)
    ours = analytic_trajectory(
        denoiser, scheduler, num_samples=3, num_inference_steps=4, seed=5, eta=0.5, batch_size=2, show_progress=False
    )
    assert ours.timesteps == [int(t) for t in scheduler.timesteps] and ours.seed == 5
    torch.testing.assert_close(ours.xt, xt, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.x0, x0, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(ours.final, final, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("which", ["analytic", "trained"])
def test_trajectory_does_not_depend_on_batch_size(wiener, which):
    def run(batch_size, seed=7):
        kwargs = dict(num_samples=5, num_inference_steps=3, seed=seed, batch_size=batch_size, show_progress=False)
        if which == "analytic":
            return analytic_trajectory(wiener, ddim_scheduler_like(DDPMScheduler()), **kwargs)
        return trained_trajectory(wiener, DDPMScheduler(), **kwargs)

    whole, split = run(5), run(2)
    assert whole.xt.shape == whole.x0.shape == (3, 5, 1, 8, 8) and whole.final.shape == (5, 1, 8, 8)
    assert whole.timesteps == split.timesteps == [666, 333, 0]
    torch.testing.assert_close(whole.xt, split.xt)
    torch.testing.assert_close(whole.x0, split.x0)
    torch.testing.assert_close(whole.final, split.final)
    # Sample i starts from the noise of (seed, i); another seed gives other noise.
    noise = torch.stack([torch.randn((1, 8, 8), generator=g) for g in generators_for_indices(7, range(5))])
    torch.testing.assert_close(whole.xt[0], noise)
    assert not torch.allclose(whole.xt[0], run(5, seed=8).xt[0])


def test_the_two_loops_agree_on_the_same_model(wiener):
    # The Wiener denoiser as the trained network (called as `unet(x_t, t).sample`, epsilon turned back into x0) and
    # through the analytic pipeline: one trajectory.
    kwargs = dict(num_samples=3, num_inference_steps=4, seed=1, eta=0.3, show_progress=False)
    trained = trained_trajectory(wiener, DDPMScheduler(), **kwargs)
    analytic = analytic_trajectory(wiener, ddim_scheduler_like(DDPMScheduler()), **kwargs)
    assert trained.timesteps == analytic.timesteps
    for ours, theirs in ((analytic.xt, trained.xt), (analytic.x0, trained.x0), (analytic.final, trained.final)):
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


def test_the_analytic_trajectory_defaults_to_the_denoisers_ddim(wiener):
    trajectory = analytic_trajectory(wiener, num_samples=2, num_inference_steps=2, show_progress=False)
    assert trajectory.timesteps == [500, 0] and trajectory.xt.dtype == torch.float32


def test_bad_counts_are_clear_errors(wiener):
    with pytest.raises(ValueError, match="must be positive"):
        trained_trajectory(wiener, DDPMScheduler(), num_samples=0, show_progress=False)
    with pytest.raises(ValueError, match="must be positive"):
        analytic_trajectory(wiener, batch_size=0, show_progress=False)
