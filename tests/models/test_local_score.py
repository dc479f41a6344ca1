"""LS machine: the closed form against an independent float64 brute force (explicit loops over patch positions), its
limits (k covering the image = the optimal denoiser), chunking, class labels and the patch-size schedule."""

import math

import pytest
import torch

import diffusers_analytic as da
from tests.models.patch_brute_force import ls_brute_force, model_space, optimal_brute_force, relative_error


@pytest.fixture(scope="module")
def data(digits):
    crops = da.load_builtin("patches", size=8, num_images=40, seed=1, channels=3)
    return {
        "digits": digits.images[:16],
        "crops": crops.images[:16],
        "crops_queries": crops.images[24:],
        "digits_queries": digits.images[100:],
    }


def noisy(images: torch.Tensor, a: float, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = model_space(images)
    return (math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=g, dtype=torch.float64)).float()


@pytest.mark.parametrize("name", ["digits", "crops"])
@pytest.mark.parametrize("padding", ["zeros", "circular"])
@pytest.mark.parametrize("k, t", [(1, 50), (3, 300), (9, 200), (17, 450)])
def test_matches_float64_brute_force(data, name, padding, k, t):
    images = data[name]
    den = da.LocalScoreDenoiser.from_dataset(images, patch_size_schedule=k, padding=padding, chunk_size=10)
    a = den.alphas_cumprod[t].item()
    x = noisy(data[f"{name}_queries"][:2], a, seed=k + t)
    reference = ls_brute_force(x, images, a, k, padding)
    assert relative_error(den.denoise(x, t), reference) <= 1e-4


@pytest.mark.parametrize("name", ["digits", "crops"])
def test_patch_covering_the_image_is_the_optimal_denoiser(data, name):
    # Zero padding, k = 2 * 8 - 1: every pixel's window holds the whole image (and zeros), so w_p(i) = w_i.
    images = data[name]
    den = da.LocalScoreDenoiser.from_dataset(images, patch_size_schedule=15)
    for t in (100, 500):
        a = den.alphas_cumprod[t].item()
        x = noisy(data[f"{name}_queries"][:3], a, seed=t)
        assert relative_error(den.denoise(x, t), optimal_brute_force(x, images, a)) <= 1e-4
    # Beyond 2 H - 1 only zeros are added: the same result.
    wider = da.LocalScoreDenoiser.from_dataset(images, patch_size_schedule=31)
    torch.testing.assert_close(wider.denoise(x, 500), den.denoise(x, 500), rtol=0, atol=0)


def test_circular_patch_of_the_image_size_is_the_optimal_denoiser():
    # 7x7 images, circular padding, k = 7: each window holds every pixel exactly once.
    crops = da.load_builtin("patches", size=7, num_images=20, seed=2, channels=3).images
    den = da.LocalScoreDenoiser.from_dataset(crops[:16], patch_size_schedule=7, padding="circular")
    a = den.alphas_cumprod[300].item()
    x = noisy(crops[16:], a, seed=0)
    assert relative_error(den.denoise(x, 300), optimal_brute_force(x, crops[:16], a)) <= 1e-4


def test_chunk_size_does_not_change_the_result(data):
    x = noisy(data["crops_queries"][:3], 0.4, seed=1)
    results = [
        da.LocalScoreDenoiser.from_dataset(data["crops"], patch_size_schedule=5, chunk_size=size).denoise(x, 400)
        for size in (1, 7, 1000)
    ]
    for result in results[1:]:
        torch.testing.assert_close(result, results[0], rtol=1e-5, atol=1e-5)


def test_float_storage_equals_uint8_storage(data):
    x = noisy(data["digits_queries"][:2], 0.5, seed=2)
    as_uint8 = da.LocalScoreDenoiser.from_dataset(data["digits"], patch_size_schedule=3)
    as_float = da.LocalScoreDenoiser.from_dataset(data["digits"].float() / 127.5 - 1, patch_size_schedule=3)
    assert as_uint8.images.dtype == torch.uint8 and as_float.images.dtype == torch.float32
    torch.testing.assert_close(as_uint8.denoise(x, 300), as_float.denoise(x, 300), rtol=1e-5, atol=1e-5)


def test_class_labels_restrict_to_the_class(digits):
    images, labels = digits.images[:60], digits.labels[:60]
    den = da.LocalScoreDenoiser.from_dataset(images, labels=labels, patch_size_schedule=5)
    assert den.config.has_labels and sorted(den._known_labels().tolist()) == sorted(set(labels.tolist()))
    x = noisy(digits.images[200:202], 0.3, seed=3)
    out = den.denoise(x, 500, class_labels=[4, 7])
    for b, label in enumerate((4, 7)):
        only = da.LocalScoreDenoiser.from_dataset(images[labels == label], patch_size_schedule=5)
        torch.testing.assert_close(out[b : b + 1], only.denoise(x[b : b + 1], 500), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="Unknown class labels"):
        den.denoise(x, 500, class_labels=[4, 99])


def test_the_schedule_picks_k_per_sample(data):
    schedule = [[2.0, 1], [-2.5, 3], [-5.0, 5]]
    den = da.LocalScoreDenoiser.from_dataset(data["digits"], patch_size_schedule=schedule)
    fixed = {k: da.LocalScoreDenoiser.from_dataset(data["digits"], patch_size_schedule=k) for k in (1, 3, 5)}
    timesteps = torch.tensor([50.0, 420.5, 990.0])
    a, b = den.alpha_prod_at(timesteps)
    log_snr = (a.log() - b.log()).tolist()
    expected = [1 if s >= 2.0 else 3 if s >= -2.5 else 5 for s in log_snr]
    assert den.patch_size_at(timesteps) == expected and len(set(expected)) == 3
    x = noisy(data["digits_queries"][:3], 0.5, seed=4)
    out = den.denoise(x, timesteps)
    for i, k in enumerate(expected):
        torch.testing.assert_close(out[i : i + 1], fixed[k].denoise(x[i : i + 1], timesteps[i]), rtol=0, atol=0)
    torch.testing.assert_close(den.denoise_with_patch_size(x, 300, 5), fixed[5].denoise(x, 300), rtol=0, atol=0)


def test_bad_config_is_a_clear_error(data):
    with pytest.raises(ValueError, match="padding"):
        da.LocalScoreDenoiser.from_dataset(data["digits"], padding="reflect")
    with pytest.raises(ValueError, match="odd positive"):
        da.LocalScoreDenoiser.from_dataset(data["digits"], patch_size_schedule=4)
    with pytest.raises(ValueError, match="chunk_size"):
        da.LocalScoreDenoiser.from_dataset(data["digits"], chunk_size=0)
