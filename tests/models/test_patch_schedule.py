"""Patch-size schedules: the presets reproduce the authors' 20-step sizes at their own noise levels, a denoiser maps
integer and fractional timesteps of several schedulers to the k of their log-SNR, and `from_dataset` chooses the
documented schedule for the image size (and the boundary-aware ELS with zero padding) unless told otherwise."""

import logging
import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import diffusers_analytic as da
from diffusers_analytic.models.patch_schedule import (
    PATCH_SIZE_PRESETS,
    default_patch_size_schedule,
    patch_sizes_at,
    resolve_patch_size_schedule,
    schedule_from_steps,
)

PAPER = {  # the scales files of github.com/Kambm/convolutional_diffusion, files/scales_*.pt
    "cifar10_unet": [3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 13, 13, 15, 17, 25],
    "cifar10_resnet": [3, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 11, 13, 15, 17, 17, 17],
    "cifar10_resnet_circular": [3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15, 15],
    "mnist_unet": [3, 3, 3, 5, 5, 7, 7, 7, 9, 9, 9, 11, 13, 15, 17, 21, 23, 23, 25, 27],
    "mnist_resnet": [3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15],
    "mnist_resnet_circular": [3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 11, 9, 9, 7, 7, 3, 3],
    "fashion_mnist_unet": [3, 3, 5, 5, 7, 7, 7, 9, 11, 11, 11, 13, 15, 15, 21, 23, 25, 25, 25, 25],
    "fashion_mnist_resnet": [3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17],
    "celeba_unet": [3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 13, 19, 27],
    "celeba_resnet": [3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 15, 19, 19],
}


def cosine_abar(s: float) -> float:
    return math.cos((s / 1.008) * math.pi / 2) ** 2


def expected_k(schedule, log_snr: float) -> int:
    """The rule written out: the first breakpoint at or below log_snr, else the last size."""
    for breakpoint, k in schedule:
        if log_snr >= breakpoint:
            return k
    return schedule[-1][1]


@pytest.mark.parametrize("name", sorted(PAPER))
def test_presets_give_the_papers_sizes_at_the_papers_steps(name):
    schedule = resolve_patch_size_schedule(name)
    for i, k in enumerate(PAPER[name]):
        for s in (i / 20, (i + 0.4) / 20, max(0.0, (i - 0.4) / 20)):  # the step itself and around it
            abar = torch.tensor([cosine_abar(s)], dtype=torch.float64)
            assert patch_sizes_at(schedule, abar, 1 - abar) == [k], (name, i, s)
    assert resolve_patch_size_schedule("default") == resolve_patch_size_schedule("cifar10_unet")


def test_extreme_noise_levels():
    schedule = resolve_patch_size_schedule("mnist_unet")
    one, zero = torch.tensor([1.0], dtype=torch.float64), torch.tensor([0.0], dtype=torch.float64)
    assert patch_sizes_at(schedule, one, zero) == [3]  # a = 1: log-SNR +inf, the lowest-noise size
    assert patch_sizes_at(schedule, zero, one) == [27]  # a = 0: log-SNR -inf, the noisiest size
    assert patch_sizes_at(resolve_patch_size_schedule(5), zero, one) == [5]


@pytest.mark.parametrize(
    "scheduler",
    [
        DDIMScheduler(),
        EulerDiscreteScheduler(use_karras_sigmas=True),
        EulerDiscreteScheduler(timestep_spacing="linspace"),
        DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"),
    ],
    ids=["ddim", "euler-karras", "euler-linspace", "dpm++"],
)
def test_denoiser_maps_scheduler_timesteps_to_the_k_of_their_log_snr(digits, scheduler):
    den = da.LocalScoreDenoiser.from_dataset(digits.images[:10], patch_size_schedule="celeba_unet", padding="circular")
    schedule = PATCH_SIZE_PRESETS["celeba_unet"]
    scheduler.set_timesteps(25)
    alphas = scheduler.alphas_cumprod.double()
    seen = set()
    for i, t in enumerate(scheduler.timesteps):
        t = float(t)
        if hasattr(scheduler, "sigmas") and isinstance(scheduler, EulerDiscreteScheduler):
            log_snr = -2 * math.log(float(scheduler.sigmas[i]))  # Euler's own sigma at its (fractional) t
        else:
            assert t == int(t)
            log_snr = math.log(alphas[int(t)] / (1 - alphas[int(t)]))
        k = expected_k(schedule, log_snr)
        assert den.patch_size_at(t) == [k], (i, t)
        seen.add(k)
    assert len(seen) >= 4
    if isinstance(scheduler, EulerDiscreteScheduler) and scheduler.config.use_karras_sigmas:
        assert any(float(t) != int(float(t)) for t in scheduler.timesteps)  # fractional timesteps were covered


def test_schedule_from_steps_round_trips():
    log_snrs = [-8.0, -4.0, -1.0, 0.5, 3.0, math.inf]  # noisiest first, as a reverse process runs
    sizes = [9, 7, 7, 5, 3, 1]
    schedule = schedule_from_steps(log_snrs, sizes)
    resolved = resolve_patch_size_schedule(schedule)
    a = torch.tensor([1 / (1 + math.exp(-v)) if math.isfinite(v) else 1.0 for v in log_snrs], dtype=torch.float64)
    assert patch_sizes_at(resolved, a, 1 - a) == sizes
    assert len(schedule) == 5  # the two neighbouring 7s share one entry
    assert all(math.isfinite(b) for b, _ in schedule)


def test_invalid_schedules_are_clear_errors():
    cases = [
        (4, "odd positive"),
        ("imagenet", "Unknown patch-size preset"),
        ([], "non-empty"),
        ([[0.0, 3], [0.0, 5]], "strictly decreasing"),
        ([[float("inf"), 3]], "finite"),
        ([[0.0, 3, 1]], "pair"),
        ([[0.0, 0]], "odd positive"),
    ]
    for schedule, message in cases:
        with pytest.raises(ValueError, match=message):
            resolve_patch_size_schedule(schedule)


def test_default_schedule_of_the_image_size():
    assert default_patch_size_schedule(8, 8)[0] == "mnist_unet"  # below the 28-32 px calibration: sizes in pixels
    assert default_patch_size_schedule(25, 25)[0] == "mnist_unet"
    assert default_patch_size_schedule(8, 40)[0] == "mnist_unet"  # the shorter side decides
    assert default_patch_size_schedule(28, 28)[0] == "cifar10_unet"
    assert default_patch_size_schedule(32, 32)[0] == "cifar10_unet"
    scaled, why = default_patch_size_schedule(64, 64)  # cifar10_unet's sizes doubled, to the nearest odd size
    assert [k for _, k in scaled] == [7, 7, 7, 7, 11, 11, 11, 11, 15, 15, 15, 15, 19, 19, 23, 27, 27, 31, 35, 51]
    assert [b for b, _ in scaled] == [b for b, _ in PATCH_SIZE_PRESETS["cifar10_unet"]] and "x 2" in why
    assert resolve_patch_size_schedule(scaled)  # a valid config value


def test_from_dataset_chooses_the_schedule_of_the_image_size_and_logs_it(digits, caplog, tmp_path):
    with caplog.at_level(logging.INFO, logger="diffusers_analytic"):
        ls = da.LocalScoreDenoiser.from_dataset(digits.images[:20])
    assert ls.config.patch_size_schedule == "mnist_unet"
    assert "patch_size_schedule='mnist_unet'" in caplog.text and "8 px" in caplog.text
    els = da.EquivariantLocalScoreDenoiser.from_dataset(digits.images[:20])
    assert els.config.patch_size_schedule == "mnist_unet" and els.config.boundary_aware is True
    patches = da.load_builtin("patches", size=32, num_images=4, seed=0, channels=3)
    for cls in (da.LocalScoreDenoiser, da.EquivariantLocalScoreDenoiser):
        assert cls.from_dataset(patches).config.patch_size_schedule == "cifar10_unet"
    els.save_pretrained(tmp_path / "els")  # the chosen values are in the config: a reload reproduces them
    loaded = da.EquivariantLocalScoreDenoiser.from_pretrained(tmp_path / "els")
    assert loaded.config.patch_size_schedule == "mnist_unet" and loaded.config.boundary_aware is True


def test_explicit_settings_win(digits):
    images = digits.images[:20]
    assert da.LocalScoreDenoiser.from_dataset(images, patch_size_schedule=5).config.patch_size_schedule == 5
    els = da.EquivariantLocalScoreDenoiser.from_dataset(
        images, patch_size_schedule="celeba_unet", boundary_aware=False
    )
    assert els.config.patch_size_schedule == "celeba_unet" and els.config.boundary_aware is False
    circular = da.EquivariantLocalScoreDenoiser.from_dataset(images, padding="circular")
    assert circular.config.boundary_aware is False and circular.config.training_patches == "wrapped"
