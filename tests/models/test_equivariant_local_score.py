"""ELS machine: the closed form against an independent float64 brute force (explicit loops over patch positions) with
zero, circular and boundary-aware rules, its limits (k = 1, k covering the image), chunking, equivariance under
circular shifts, class labels, and pipelines with several schedulers, saved and reloaded."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import diffusers_analytic as da
from tests.models.patch_brute_force import (
    els_brute_force,
    els_valid_patches_brute_force,
    model_space,
    optimal_brute_force,
    relative_error,
)


@pytest.fixture(scope="module")
def data(digits):
    crops = da.load_builtin("patches", size=8, num_images=30, seed=1, channels=3)
    return {
        "digits": digits.images[:8],
        "crops": crops.images[:8],
        "crops_queries": crops.images[24:],
        "digits_queries": digits.images[100:],
    }


def noisy(images: torch.Tensor, a: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = model_space(images)
    return (math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()


CASES = [
    ("zeros", False, 1, 50),
    ("zeros", False, 3, 300),
    ("zeros", False, 5, 600),
    ("zeros", True, 3, 200),
    ("zeros", True, 7, 700),
    ("circular", False, 3, 250),
    ("circular", False, 9, 150),
]


@pytest.mark.parametrize("name", ["digits", "crops"])
@pytest.mark.parametrize("padding, boundary_aware, k, t", CASES)
def test_matches_float64_brute_force(data, name, padding, boundary_aware, k, t):
    images = data[name]
    den = da.EquivariantLocalScoreDenoiser.from_dataset(
        images, patch_size_schedule=k, padding=padding, boundary_aware=boundary_aware, chunk_size=100
    )
    a = den.alphas_cumprod[t].item()
    x = noisy(data[f"{name}_queries"][:2], a, seed=k + t)
    reference = els_brute_force(x, images, a, k, padding, boundary_aware)
    assert relative_error(den.denoise(x, t), reference) <= 1e-4


@pytest.mark.parametrize("k, t", [(1, 100), (3, 50), (3, 400), (5, 250), (7, 700)])
@pytest.mark.parametrize("shape", [(8, 8), (9, 7)], ids=["8x8", "9x7"])
def test_circular_valid_patches_match_the_authors_circular_machine(k, t, shape):
    # Random images and queries, float64 brute force of LocalEquivScoreModule's definition (top-left corners, loops).
    g = torch.Generator().manual_seed(k + t)
    images = torch.rand(13, 2, *shape, generator=g) * 2 - 1
    den = da.EquivariantLocalScoreDenoiser.from_dataset(
        images, patch_size_schedule=k, padding="circular", training_patches="valid", chunk_size=50
    )
    assert den.config.training_patches == "valid"
    assert den.num_training_patches(k) == 13 * (shape[0] - k + 1) * (shape[1] - k + 1)
    a = den.alphas_cumprod[t].item()
    x = (math.sqrt(a) * images[:3] + math.sqrt(1 - a) * torch.randn(3, 2, *shape, generator=g)).float()
    assert relative_error(den.denoise(x, t), els_valid_patches_brute_force(x, images, a, k)) <= 1e-5


def test_circular_valid_patches_differ_from_wrapped_and_cap_the_size(data):
    images = data["crops"]
    valid = da.EquivariantLocalScoreDenoiser.from_dataset(
        images, patch_size_schedule=9, padding="circular", training_patches="valid"
    )
    wrapped = da.EquivariantLocalScoreDenoiser.from_dataset(images, patch_size_schedule=9, padding="circular")
    assert wrapped.config.training_patches == "wrapped" and wrapped.patch_size_at(300) == [9]
    assert valid.patch_size_at(300) == [7]  # 8x8 images have no valid 9x9 patch
    a = valid.alphas_cumprod[300].item()
    x = noisy(data["crops_queries"][:2], a, seed=2)
    reference = els_valid_patches_brute_force(x, images, a, 7)
    assert relative_error(valid.denoise(x, 300), reference) <= 1e-5
    assert relative_error(wrapped.denoise(x, 300), reference) > 0.05


def test_training_patches_is_saved_and_loaded(data, tmp_path):
    den = da.EquivariantLocalScoreDenoiser.from_dataset(
        data["digits"], patch_size_schedule=3, padding="circular", training_patches="valid"
    )
    den.save_pretrained(tmp_path / "els")
    loaded = da.EquivariantLocalScoreDenoiser.from_pretrained(tmp_path / "els")
    assert loaded.config.training_patches == "valid" and loaded.config.padding == "circular"
    x = noisy(data["digits_queries"][:2], 0.5, seed=4)
    torch.testing.assert_close(loaded.denoise(x, 300), den.denoise(x, 300), rtol=0, atol=0)
    zeros = da.EquivariantLocalScoreDenoiser.from_dataset(data["digits"], patch_size_schedule=3)
    assert zeros.config.training_patches == "valid"


def test_zero_padded_size_beyond_the_image_is_capped(data):
    # 8x8 images have no valid 9x9 patch: k is capped at 7, the largest odd size with one.
    den = da.EquivariantLocalScoreDenoiser.from_dataset(data["digits"], patch_size_schedule=9, boundary_aware=False)
    assert den.patch_size_at(300) == [7] and den.num_training_patches(9) == 8 * 4
    a = den.alphas_cumprod[300].item()
    x = noisy(data["digits_queries"][:2], a, seed=0)
    assert relative_error(den.denoise(x, 300), els_brute_force(x, data["digits"], a, 7, "zeros")) <= 1e-4


@pytest.mark.parametrize("name", ["digits", "crops"])
def test_patch_size_one_is_a_per_pixel_posterior_over_all_pixel_values(data, name):
    images = data[name]
    y = model_space(images)
    values = y.permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # every pixel of every image  [N H W, C]
    for padding in ("zeros", "circular"):
        den = da.EquivariantLocalScoreDenoiser.from_dataset(images, patch_size_schedule=1, padding=padding)
        a = den.alphas_cumprod[400].item()
        x = noisy(data[f"{name}_queries"][:2], a, seed=5)
        pixels = x.double().permute(0, 2, 3, 1).reshape(-1, y.shape[1])  # [B H W, C]
        logits = -(pixels[:, None] - math.sqrt(a) * values[None]).square().sum(-1) / (2 * (1 - a))
        expected = (torch.softmax(logits, dim=1) @ values).reshape(2, 8, 8, -1).permute(0, 3, 1, 2)
        assert relative_error(den.denoise(x, 400), expected) <= 1e-4


def test_boundary_aware_covering_the_image_is_the_optimal_denoiser(data):
    # k = 15 on 8x8: every pixel is its own border group, compared with the N patches at its own position.
    den = da.EquivariantLocalScoreDenoiser.from_dataset(data["crops"], patch_size_schedule=15, boundary_aware=True)
    a = den.alphas_cumprod[350].item()
    x = noisy(data["crops_queries"][:2], a, seed=6)
    assert relative_error(den.denoise(x, 350), optimal_brute_force(x, data["crops"], a)) <= 1e-4


def test_chunk_size_does_not_change_the_result(data):
    x = noisy(data["crops_queries"][:2], 0.4, seed=1)
    for boundary_aware in (False, True):
        results = [
            da.EquivariantLocalScoreDenoiser.from_dataset(
                data["crops"], patch_size_schedule=3, boundary_aware=boundary_aware, chunk_size=size
            ).denoise(x, 400)
            for size in (5, 100000)
        ]
        for result in results[1:]:
            torch.testing.assert_close(result, results[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("k", [3, 5])
def test_circular_machine_commutes_with_circular_shifts(data, k):
    den = da.EquivariantLocalScoreDenoiser.from_dataset(data["crops"], patch_size_schedule=k, padding="circular")
    x = noisy(data["crops_queries"][:2], 0.3, seed=k)
    out = den.denoise(x, 500)
    for shift in ((1, 2), (3, -1), (0, 5)):
        shifted = den.denoise(torch.roll(x, shift, dims=(2, 3)), 500)
        torch.testing.assert_close(shifted, torch.roll(out, shift, dims=(2, 3)), rtol=1e-5, atol=1e-5)


def test_class_labels_restrict_to_the_class(digits):
    images, labels = digits.images[:40], digits.labels[:40]
    den = da.EquivariantLocalScoreDenoiser.from_dataset(images, labels=labels, patch_size_schedule=3, chunk_size=50)
    x = noisy(digits.images[200:202], 0.3, seed=3)
    out = den.denoise(x, 500, class_labels=torch.tensor([2, 9]))
    for b, label in enumerate((2, 9)):
        only = da.EquivariantLocalScoreDenoiser.from_dataset(images[labels == label], patch_size_schedule=3)
        torch.testing.assert_close(out[b : b + 1], only.denoise(x[b : b + 1], 500), rtol=1e-5, atol=1e-5)


def test_bad_config_is_a_clear_error(data):
    with pytest.raises(ValueError, match="zero padding"):
        da.EquivariantLocalScoreDenoiser.from_dataset(data["digits"], padding="circular", boundary_aware=True)
    with pytest.raises(ValueError, match="'wrapped' needs padding='circular'"):
        da.EquivariantLocalScoreDenoiser.from_dataset(data["digits"], training_patches="wrapped")
    with pytest.raises(ValueError, match="`training_patches` must be one of"):
        da.EquivariantLocalScoreDenoiser.from_dataset(data["digits"], padding="circular", training_patches="all")
    with pytest.raises(ValueError, match="strictly decreasing"):
        da.EquivariantLocalScoreDenoiser.from_dataset(data["digits"], patch_size_schedule=[[0.0, 3], [1.0, 5]])


@pytest.mark.parametrize(
    "scheduler",
    [
        DDIMScheduler(),
        EulerDiscreteScheduler(use_karras_sigmas=True),
        DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2),
    ],
    ids=["ddim", "euler-karras", "dpm++2m"],
)
def test_pipeline_with_schedulers_and_save_load(digits, scheduler, tmp_path):
    den = da.EquivariantLocalScoreDenoiser.from_dataset(
        digits.images[:30], patch_size_schedule=[[1.0, 3], [-3.0, 5]], boundary_aware=True
    )
    pipe = da.AnalyticDDIMPipeline(unet=den, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    images = pipe(
        batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert images.shape == (2, 8, 8, 1) and (images >= 0).all() and (images <= 1).all()
    pipe.save_pretrained(tmp_path / "els")
    loaded = da.AnalyticDDIMPipeline.from_pretrained(tmp_path / "els")
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.unet, da.EquivariantLocalScoreDenoiser) and loaded.unet.config.boundary_aware
    again = loaded(
        batch_size=2, num_inference_steps=6, generator=torch.Generator().manual_seed(0), output_type="np"
    ).images
    assert (again == images).all()
