"""WienerDenoiser: fitted statistics, the closed form against an independent float64 implementation, and the end-to-end
guarantee that sampling with the exact Gaussian score reproduces the Gaussian."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler

import diffusers_analytic as da
from tests.testing_utils import random_gaussian, sample_gaussian

SHAPE = (1, 4, 5)  # D = 20
DIM = 20


def reference_alpha(alphas_cumprod: np.ndarray, t: float) -> float:
    """a(t) by linear interpolation of log sigma between integer steps, in float64 numpy (docs/math.md)."""
    lo = int(np.floor(t))
    hi = min(lo + 1, len(alphas_cumprod) - 1)
    frac = t - lo
    if frac == 0:
        return float(alphas_cumprod[lo])
    log_sigma = lambda a: 0.5 * np.log((1 - a) / a)  # noqa: E731
    s = (1 - frac) * log_sigma(alphas_cumprod[lo]) + frac * log_sigma(alphas_cumprod[hi])
    return float(1.0 / (1.0 + np.exp(2 * s)))


def reference_wiener(x: np.ndarray, a: float, mean: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """x0_hat = mu + S (a S + (1 - a) I)^{-1} sqrt(a) (x - sqrt(a) mu): the matrix form, no eigendecomposition."""
    dim = len(mean)
    gain = np.sqrt(a) * cov @ np.linalg.inv(a * cov + (1 - a) * np.eye(dim))
    return mean + (x - np.sqrt(a) * mean) @ gain.T


@pytest.fixture(scope="module")
def gaussian_fit():
    mean, cov = random_gaussian(DIM, seed=1)
    data = sample_gaussian(mean, cov, 500, seed=2).float().reshape(-1, *SHAPE)
    denoiser = da.WienerDenoiser.from_dataset(data, batch_size=64, show_progress=False, value_range=None)
    return data, denoiser


def test_fitted_statistics_match_numpy(gaussian_fit):
    data, denoiser = gaussian_fit
    flat = data.reshape(len(data), -1).double().numpy()
    mean, cov = flat.mean(0), np.cov(flat, rowvar=False, ddof=1)
    fitted_cov = (denoiser.eigvecs.double() * denoiser.eigvals.double()) @ denoiser.eigvecs.double().T
    np.testing.assert_allclose(denoiser.mean.double().numpy(), mean, rtol=0, atol=1e-6)
    assert np.linalg.norm(fitted_cov.numpy() - cov) / np.linalg.norm(cov) < 1e-6
    assert (denoiser.eigvals[:-1] >= denoiser.eigvals[1:]).all()  # sorted descending
    assert (denoiser.eigvals >= 0).all()


def test_fit_does_not_depend_on_batch_size(gaussian_fit):
    data, denoiser = gaussian_fit
    other = da.WienerDenoiser.from_dataset(data, batch_size=7, show_progress=False, value_range=None)
    x = torch.randn(5, *SHAPE)
    torch.testing.assert_close(other.denoise(x, 300), denoiser.denoise(x, 300), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_denoise_matches_float64_closed_form(gaussian_fit, seed):
    data, denoiser = gaussian_fit
    flat = data.reshape(len(data), -1).double().numpy()
    mean, cov = flat.mean(0), np.cov(flat, rowvar=False, ddof=1)
    alphas = denoiser.alphas_cumprod.numpy()
    g = torch.Generator().manual_seed(100 + seed)
    timesteps = torch.rand(6, generator=g, dtype=torch.float64) * 999
    timesteps[:3] = timesteps[:3].round()  # integer and fractional
    x = torch.randn(6, *SHAPE, generator=g) * 2.0
    out = denoiser.denoise(x, timesteps).reshape(6, -1).double().numpy()
    for b, t in enumerate(timesteps.tolist()):
        expected = reference_wiener(x[b].reshape(-1).double().numpy(), reference_alpha(alphas, t), mean, cov)
        rel = np.linalg.norm(out[b] - expected) / np.linalg.norm(expected)
        assert rel <= 1e-5, (t, rel)


def test_rank_keeps_top_components_and_an_isotropic_floor(gaussian_fit):
    data, _ = gaussian_fit
    rank = 6
    denoiser = da.WienerDenoiser.from_dataset(data, rank=rank, show_progress=False, value_range=None)
    flat = data.reshape(len(data), -1).double().numpy()
    mean, cov = flat.mean(0), np.cov(flat, rowvar=False, ddof=1)
    lam, vec = np.linalg.eigh(cov)
    lam, vec = lam[::-1], vec[:, ::-1]
    floor = lam[rank:].mean()
    top = vec[:, :rank]
    reduced = top @ np.diag(lam[:rank]) @ top.T + floor * (np.eye(DIM) - top @ top.T)
    assert denoiser.eigvecs.shape == (DIM, rank)
    assert denoiser.eigval_floor.item() == pytest.approx(floor, rel=1e-5)
    x = torch.randn(4, *SHAPE)
    a = denoiser.alphas_cumprod[400].item()
    out = denoiser.denoise(x, 400).reshape(4, -1).double().numpy()
    expected = reference_wiener(x.reshape(4, -1).double().numpy(), a, mean, reduced)
    assert np.linalg.norm(out - expected) / np.linalg.norm(expected) <= 1e-5
    # The floor keeps the total variance.
    assert np.trace(reduced) == pytest.approx(np.trace(cov), rel=1e-10)


def test_rank_out_of_range_is_an_error(gaussian_fit):
    data, _ = gaussian_fit
    with pytest.raises(ValueError, match="rank"):
        da.WienerDenoiser.from_dataset(data, rank=DIM + 1, show_progress=False, value_range=None)
    with pytest.raises(ValueError, match="rank"):
        da.WienerDenoiser.from_dataset(data, rank=0, show_progress=False, value_range=None)


def test_sampling_reproduces_the_gaussian():
    """The Wiener denoiser is the exact score of N(mu, S): DDIM samples from it have mean mu and covariance S."""
    dim = 16
    mean, cov = random_gaussian(dim, seed=7, scale=1.5)  # not inside [-1, 1]
    data = sample_gaussian(mean, cov, 20000, seed=8).float().reshape(-1, 1, 4, 4)
    denoiser = da.WienerDenoiser.from_dataset(data, batch_size=4096, show_progress=False, value_range=None)
    fitted_mean = denoiser.mean.double()
    fitted_cov = (denoiser.eigvecs.double() * denoiser.eigvals.double()) @ denoiser.eigvecs.double().T

    pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(
        batch_size=4000, num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="latent"
    ).images
    samples = samples.reshape(4000, -1).double()
    sample_cov = torch.cov(samples.T)
    cov_error = torch.linalg.norm(sample_cov - fitted_cov) / torch.linalg.norm(fitted_cov)
    mean_error = torch.linalg.norm(samples.mean(0) - fitted_mean) / torch.linalg.norm(fitted_mean)
    assert cov_error < 0.09, cov_error
    assert mean_error < 0.03, mean_error
    # And the test can fail: a denoiser fitted on a different Gaussian is far off.
    assert torch.linalg.norm(torch.eye(dim, dtype=torch.float64) - fitted_cov) / torch.linalg.norm(fitted_cov) > 0.3


def test_accepts_uint8_float_dataset_and_batch_iterables(digits):
    images = digits.images[:200]
    from_uint8 = da.WienerDenoiser.from_dataset(images, show_progress=False)
    from_float = da.WienerDenoiser.from_dataset(images.float() / 127.5 - 1, show_progress=False)
    from_batches = da.WienerDenoiser.from_dataset([images[:64], images[64:]], show_progress=False)
    import datasets
    from PIL import Image

    pil = [Image.fromarray(im[0].numpy(), mode="L") for im in images]
    dataset = datasets.Dataset.from_dict({"picture": pil, "label": digits.labels[:200].tolist()})
    dataset = dataset.cast_column("picture", datasets.Image())
    from_hf = da.WienerDenoiser.from_dataset(dataset, channels=1, show_progress=False)
    for other in (from_float, from_batches, from_hf):
        torch.testing.assert_close(other.mean, from_uint8.mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(other.eigvals, from_uint8.eigvals, rtol=1e-4, atol=1e-6)
    assert from_uint8.config.sample_size == 8 and from_uint8.config.in_channels == 1


@pytest.mark.parametrize(
    "bad, message",
    [
        (torch.empty(0, 1, 8, 8), "empty"),
        (torch.full((4, 1, 8, 8), float("nan")), "NaN"),
        (torch.tensor([[[[float("inf")]]]]).expand(4, 1, 2, 2).clone(), "NaN or infinite"),
        (torch.zeros(4, 8, 8), "N, C, H, W"),
        (torch.zeros(4, 1, 8, 8, dtype=torch.int32), "uint8"),
    ],
)
def test_bad_data_is_a_clear_error(bad, message):
    with pytest.raises(ValueError, match=message):
        da.WienerDenoiser.from_dataset(bad, show_progress=False)


def test_single_image_and_config_conflicts_are_errors(digits):
    with pytest.raises(ValueError, match="at least 2 images"):
        da.WienerDenoiser.from_dataset(digits.images[:1], show_progress=False)
    with pytest.raises(ValueError, match="sample_size"):
        da.WienerDenoiser.from_dataset(digits.images[:10], sample_size=16, show_progress=False)
    with pytest.raises(ValueError, match="unknown config keywords"):
        da.WienerDenoiser.from_dataset(digits.images[:10], temprature=1.0, show_progress=False)
