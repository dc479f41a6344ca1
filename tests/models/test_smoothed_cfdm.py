"""SmoothedCFDMDenoiser: the optimal posterior mean averaged over Gaussian-perturbed copies of x_t."""

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils.torch_utils import randn_tensor

import diffusers_analytic as da


@pytest.fixture(scope="module")
def digits():
    subset = da.load_builtin("digits")
    return da.ImageSet(subset.images[:400], subset.labels[:400], "digits400")


def brute_force_optimal(x, alpha_prod, y):
    x = x.double().reshape(len(x), -1)
    a = torch.as_tensor(alpha_prod, dtype=torch.float64)
    distances = ((x[:, None, :] - a.sqrt() * y[None]) ** 2).sum(-1)
    return torch.softmax(-distances / (2 * (1 - a)), dim=1) @ y


def test_matches_float64_average_over_the_same_noise(digits):
    denoiser = da.SmoothedCFDMDenoiser.from_dataset(digits, num_noise=4, smoothing_std=0.3, chunk_size=64)
    y = digits.images.double().reshape(400, -1) / 127.5 - 1
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    out = denoiser.denoise(x, 400, generator=torch.Generator().manual_seed(7))
    # The same noise, drawn in the documented order (copy j = 0 .. M-1, each a [B, C, H, W] draw).
    replay = torch.Generator().manual_seed(7)
    noise = [randn_tensor(x.shape, generator=replay) for _ in range(4)]
    a = denoiser.alphas_cumprod[400]
    ref = torch.stack([brute_force_optimal(x + 0.3 * z, a, y) for z in noise]).mean(0)
    err = (out.double().reshape(3, -1) - ref).norm() / ref.norm()
    assert err <= 1e-4


def test_reproducible_with_a_generator_and_random_without(digits):
    denoiser = da.SmoothedCFDMDenoiser.from_dataset(digits, num_noise=3, smoothing_std=0.2)
    x = torch.randn(2, 1, 8, 8)
    first = denoiser.denoise(x, 300, generator=torch.Generator().manual_seed(1))
    again = denoiser.denoise(x, 300, generator=torch.Generator().manual_seed(1))
    other = denoiser.denoise(x, 300, generator=torch.Generator().manual_seed(2))
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_list_of_generators_gives_each_sample_its_own_stream(digits):
    denoiser = da.SmoothedCFDMDenoiser.from_dataset(digits, num_noise=3, smoothing_std=0.2)
    x = torch.randn(3, 1, 8, 8)
    batched = denoiser.denoise(x, 300, generator=[torch.Generator().manual_seed(s) for s in (10, 11, 12)])
    for b, seed in enumerate((10, 11, 12)):
        alone = denoiser.denoise(x[b : b + 1], 300, generator=[torch.Generator().manual_seed(seed)])
        torch.testing.assert_close(batched[b : b + 1], alone, atol=1e-6, rtol=1e-6)


def test_zero_smoothing_equals_optimal_exactly(digits):
    smoothed = da.SmoothedCFDMDenoiser.from_dataset(digits, num_noise=5, smoothing_std=0.0, chunk_size=100)
    optimal = da.OptimalDenoiser.from_dataset(digits, chunk_size=100)
    x = torch.randn(4, 1, 8, 8)
    for timestep in (950, 500, 20):
        assert torch.equal(smoothed.denoise(x, timestep, generator=torch.Generator()), optimal.denoise(x, timestep))
    # and differs at smoothing_std > 0
    smoothed.register_to_config(smoothing_std=0.5)
    assert not torch.allclose(smoothed.denoise(x, 500, generator=torch.Generator()), optimal.denoise(x, 500))


def test_top_k_with_all_images_equals_exact(digits):
    exact = da.SmoothedCFDMDenoiser.from_dataset(digits, num_noise=2, smoothing_std=0.2)
    top_k = da.SmoothedCFDMDenoiser.from_dataset(digits, num_noise=2, smoothing_std=0.2, num_neighbors=400)
    x = torch.randn(2, 1, 8, 8)
    out_exact = exact.denoise(x, 600, generator=torch.Generator().manual_seed(3))
    out_top_k = top_k.denoise(x, 600, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(out_top_k, out_exact, atol=1e-5, rtol=1e-5)


def test_pipeline_reproducible_after_save_load(digits, tmp_path):
    denoiser = da.SmoothedCFDMDenoiser.from_dataset(digits, num_noise=2, smoothing_std=0.1)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=DDIMScheduler())
    images = pipe(
        batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    pipe.save_pretrained(tmp_path)
    loaded = da.AnalyticDDIMPipeline.from_pretrained(tmp_path)
    assert loaded.unet.images.dtype == torch.uint8 and torch.equal(loaded.unet.images, denoiser.images)
    again = loaded(
        batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    assert torch.equal(images, again)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"smoothing_std": -0.1}, "smoothing_std"),
        ({"smoothing_std": float("inf")}, "smoothing_std"),
        ({"num_noise": 0}, "num_noise"),
        ({"num_neighbors": 0}, "num_neighbors"),
        ({"num_neighbors": 401}, "num_neighbors"),
        ({"chunk_size": -1}, "chunk_size"),
        ({"temperature": -1.0}, "temperature"),
    ],
)
def test_bad_config(digits, config, message):
    with pytest.raises(ValueError, match=message):
        da.SmoothedCFDMDenoiser.from_dataset(digits, **config)
