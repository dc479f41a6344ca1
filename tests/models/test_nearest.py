"""NearestDatasetDenoiser: the stored image at argmin ||x_t - sqrt(a) y_i||, exact."""

import pytest
import torch
from diffusers import DDIMScheduler

import diffusers_analytic as da
from diffusers_analytic.kernels import empirical


@pytest.fixture(scope="module")
def digits():
    return da.load_builtin("digits")


@pytest.mark.parametrize("timestep, chunk_size", [(999, 7), (999, 1797), (500, 1), (500, 512), (30, 7), (30, 1797)])
def test_equals_float64_argmin(digits, chunk_size, timestep):
    denoiser = da.NearestDatasetDenoiser.from_dataset(digits, chunk_size=chunk_size)
    y = digits.images.double().reshape(len(digits.images), -1) / 127.5 - 1
    a = denoiser.alphas_cumprod[timestep]
    generator = torch.Generator().manual_seed(timestep)
    x = torch.cat(
        [
            a.sqrt() * y[:4] + (1 - a).sqrt() * torch.randn(4, 64, generator=generator, dtype=torch.float64),
            torch.randn(4, 64, generator=generator, dtype=torch.float64),
        ]
    ).float()
    out = denoiser.denoise(x.reshape(8, 1, 8, 8), timestep).double().reshape(8, -1)
    distances = ((x.double()[:, None] - a.sqrt() * y[None]) ** 2).sum(-1)  # posterior-consistent: sqrt(a) y
    best = distances.argmin(1)
    # Exact up to float32 rounding of the distances: the chosen image is at the minimal distance.
    chosen = (out[:, None] - y[None]).abs().sum(-1).argmin(1)  # which stored image came back
    gap = distances.gather(1, chosen[:, None]).squeeze(1) - distances.gather(1, best[:, None]).squeeze(1)
    assert (gap <= 1e-5 * distances.min(1).values.clamp(min=1)).all()
    torch.testing.assert_close(out, y[chosen], atol=1e-6, rtol=0)  # a stored image, to float32 rounding


@pytest.mark.parametrize("blocks", [3, 4])
def test_images_in_blocks_match_float64_argmin(digits, split_into_blocks, blocks):
    # 3 blocks of 599 digits (or 4 of 449 and a one-image tail) side by side: the float64 argmin over all images
    layouts = split_into_blocks(blocks)
    denoiser = da.NearestDatasetDenoiser.from_dataset(digits, chunk_size=100)
    generator = torch.Generator().manual_seed(11)
    y = digits.images.double().reshape(len(digits.images), -1) / 127.5 - 1
    for timestep in (999, 300, 30):
        a = float(denoiser.alphas_cumprod[timestep])
        # inputs near images of every range, and pure noise
        near = a**0.5 * y[[5, 700, 1500]] + (1 - a) ** 0.5 * torch.randn(3, 64, generator=generator, dtype=y.dtype)
        x = torch.cat([near, torch.randn(3, 64, generator=generator, dtype=y.dtype)]).float()
        out = denoiser.denoise(x.reshape(6, 1, 8, 8), timestep).double().reshape(6, -1)
        assert layouts[-1] == ([(0, 3, 599)] if blocks == 3 else [(0, 4, 449), (1796, 1, 1)])
        distances = ((x.double()[:, None] - a**0.5 * y[None]) ** 2).sum(-1)
        chosen = (out[:, None] - y[None]).abs().sum(-1).argmin(1)
        gap = distances.gather(1, chosen[:, None]).squeeze(1) - distances.min(1).values
        assert (gap <= 1e-5 * distances.min(1).values.clamp(min=1)).all()
    # the plain loop of other devices, called directly on the CPU, picks the same images
    stats = denoiser.image_stats()
    a_b = denoiser.alphas_cumprod[30].expand(6).clone()
    index, _ = empirical.nearest_indices(x, a_b, denoiser.images, stats, 100, cpu_fast_path=False)
    torch.testing.assert_close(y[index].float(), out.float(), atol=1e-6, rtol=0)
    classes = torch.tensor([3, 3, 8, 8, 0, 9])
    out = denoiser.denoise(x.reshape(6, 1, 8, 8), 30, class_labels=classes).double().reshape(6, -1)
    chosen = (out[:, None] - y[None]).abs().sum(-1).argmin(1)
    assert torch.equal(digits.labels[chosen], classes)


def test_is_the_zero_temperature_limit_of_optimal():
    # Well-separated data: N random sign images in D = 64 (pairwise distances ~ 2 sqrt(2 D)).
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(50, 1, 8, 8, generator=generator).sign()
    nearest = da.NearestDatasetDenoiser.from_dataset(data)
    optimal = da.OptimalDenoiser.from_dataset(data, temperature=1e-6)
    x = torch.randn(6, 1, 8, 8, generator=generator)
    for timestep in (900, 400, 50):
        torch.testing.assert_close(optimal.denoise(x, timestep), nearest.denoise(x, timestep), atol=1e-5, rtol=0)


def test_uses_the_scaled_distance_not_the_reference_one():
    # Two images: y_1 = 0, y_2 = 1. At a = 1/4 the point x = 0.4 is nearer to y_2 in ||x - sqrt(a) y|| (0.1 vs 0.4)
    # but nearer to y_1 in the reference's unscaled ||x - y|| (0.4 vs 0.6).
    data = torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1)
    denoiser = da.NearestDatasetDenoiser.from_dataset(data)
    timestep = int((denoiser.alphas_cumprod - 0.25).abs().argmin())
    assert abs(denoiser.alphas_cumprod[timestep] - 0.25) < 0.01
    assert denoiser.denoise(torch.full((1, 1, 1, 1), 0.4), timestep).item() == 1.0


def test_uint8_and_float_storage_and_save_load(digits, tmp_path):
    as_uint8 = da.NearestDatasetDenoiser.from_dataset(digits)
    as_float = da.NearestDatasetDenoiser.from_dataset(digits.images.float() / 127.5 - 1)
    x = torch.randn(5, 1, 8, 8)
    assert torch.equal(as_uint8.denoise(x, 300), as_float.denoise(x, 300))
    da.AnalyticDDIMPipeline(unet=as_uint8, scheduler=DDIMScheduler()).save_pretrained(tmp_path)
    loaded = da.AnalyticDDIMPipeline.from_pretrained(tmp_path).unet
    assert type(loaded) is da.NearestDatasetDenoiser
    assert loaded.images.dtype == torch.uint8 and torch.equal(loaded.images, as_uint8.images)
    assert torch.equal(loaded.labels, as_uint8.labels)
    assert torch.equal(loaded.denoise(x, 300), as_uint8.denoise(x, 300))


def test_bad_config(digits):
    with pytest.raises(ValueError, match="chunk_size"):
        da.NearestDatasetDenoiser.from_dataset(digits, chunk_size=0)
    with pytest.raises(ValueError, match="unknown config"):
        da.NearestDatasetDenoiser.from_dataset(digits, temperature=0.5)
