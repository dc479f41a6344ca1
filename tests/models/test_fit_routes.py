"""The two exact routes to the covariance's eigenbasis (`kernels.moments.covariance_eigenbasis`): the D x D covariance,
and the N x N Gram matrix when fewer images than dimensions were kept. Each fit is checked against numpy's float64
covariance of the same images, at every noise level."""

import numpy as np
import pytest
import torch

import diffusers_analytic as da
from diffusers_analytic.kernels import moments as moments_module
from diffusers_analytic.kernels.moments import StreamingMoments, covariance_eigenbasis
from tests.testing_utils import logged_warnings

SHAPE = (3, 6, 6)  # D = 108


def low_rank_images(count: int, seed: int) -> torch.Tensor:
    """`count` images in [-1, 1]-ish with a decaying spectrum and a large mean (the shift must cancel exactly)."""
    g = torch.Generator().manual_seed(seed)
    dim = int(np.prod(SHAPE))
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g, dtype=torch.float64))[0]
    scales = torch.logspace(0, -3, dim, dtype=torch.float64)
    images = 0.4 + 0.1 * (torch.randn(count, dim, generator=g, dtype=torch.float64) * scales) @ basis.T
    return images.float().reshape(count, *SHAPE)


def numpy_posterior_means(images: torch.Tensor, x: torch.Tensor, alphas: np.ndarray) -> np.ndarray:
    """mu + S (a S + (1 - a) I)^{-1} sqrt(a) (x - sqrt(a) mu) for every a, float64 numpy, no eigendecomposition."""
    flat = images.reshape(len(images), -1).double().numpy()
    mean, cov = flat.mean(0), np.cov(flat, rowvar=False, ddof=1)
    x = x.reshape(len(x), -1).double().numpy()
    out = []
    for a in alphas:
        gain = np.sqrt(a) * cov @ np.linalg.inv(a * cov + (1 - a) * np.eye(len(mean)))
        out.append(mean + (x - np.sqrt(a) * mean) @ gain.T)
    return np.stack(out)


@pytest.mark.parametrize("count", [20, 107, 108, 150])  # Gram route below D = 108, covariance route from D on
def test_wiener_fit_matches_float64_covariance_at_every_noise_level(count):
    images = low_rank_images(count, seed=count)
    denoiser = da.WienerDenoiser.from_dataset(images, batch_size=16, show_progress=False, value_range=None)
    nonzero = int((denoiser.eigvals != 0).sum())
    assert nonzero <= min(count - 1, 108)  # centred data have rank < N
    assert (denoiser.eigvals[nonzero:] == 0).all()
    if count < 108:  # Gram route: the directions past the data's rank are zero columns
        assert (denoiser.eigvecs[:, nonzero:] == 0).all()
    else:
        nonzero = 108  # covariance route: a complete orthonormal basis
    basis = denoiser.eigvecs[:, :nonzero].double()
    torch.testing.assert_close(basis.T @ basis, torch.eye(nonzero, dtype=torch.float64), rtol=0, atol=1e-5)

    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1)) * 0.5 + 0.3
    timesteps = list(range(0, 1000, 9)) + [999]
    expected = numpy_posterior_means(images, x, denoiser.alphas_cumprod[timesteps].double().numpy())
    for i, t in enumerate(timesteps):
        out = denoiser.denoise(x, t).reshape(3, -1).double().numpy()
        error = np.linalg.norm(out - expected[i]) / np.linalg.norm(expected[i])
        assert error <= 1e-5, (t, error)


@pytest.mark.parametrize("rank", [4, 30])
def test_gram_route_rank_cut_keeps_the_floor_of_the_covariance(rank):
    images = low_rank_images(25, seed=3)  # rank 24 < D
    flat = images.reshape(25, -1).double().numpy()
    spectrum = np.sort(np.linalg.eigvalsh(np.cov(flat, rowvar=False, ddof=1)))[::-1].clip(min=0)
    denoiser = da.WienerDenoiser.from_dataset(images, show_progress=False, value_range=None, rank=rank)
    kept = min(rank, 24)
    np.testing.assert_allclose(denoiser.eigvals[:kept].double().numpy(), spectrum[:kept], rtol=1e-6)
    assert (denoiser.eigvals[kept:] == 0).all()
    expected_floor = spectrum[rank:].sum() / (108 - rank) if rank < 24 else 0.0
    assert float(denoiser.eigval_floor) == pytest.approx(expected_floor, rel=1e-6, abs=1e-12)


def test_kept_rows_are_flushed_by_merge_recentre_and_the_d_th_image():
    images = low_rank_images(130, seed=4).reshape(130, -1).double()
    reference = np.cov(images.numpy(), rowvar=False, ddof=1)

    crossing = StreamingMoments(108, keep_rows=True)
    crossing.update(images[:100])
    assert crossing.rows is not None and crossing.outer is None
    crossing.update(images[100:])  # past D - 1 images: the D x D sums take over
    assert crossing.rows is None
    np.testing.assert_allclose(crossing.covariance().numpy(), reference, rtol=1e-9, atol=1e-14)

    first, second = StreamingMoments(108, keep_rows=True), StreamingMoments(108, keep_rows=True)
    first.update(images[:40])
    second.update(images[40:90])
    first.merge(second)
    first.recentre(torch.zeros(108, dtype=torch.float64))
    first.update(images[90:])
    np.testing.assert_allclose(first.covariance().numpy(), reference, rtol=1e-9, atol=1e-14)


def test_gram_route_drops_directions_below_rounding():
    dim = 108
    images = torch.zeros(12, dim, dtype=torch.float64)
    images[:6, 0], images[6:, 0] = 1.0, -1.0  # one direction of variance, the rest exactly 0
    moments = StreamingMoments(dim, keep_rows=True)
    moments.update(images)
    eigvecs, eigvals, floor = covariance_eigenbasis(moments)
    assert eigvecs.shape == (dim, 1) and floor == 0.0
    assert eigvals.item() == pytest.approx(12 / 11)
    assert abs(eigvecs[0, 0].item()) == pytest.approx(1.0)


def test_pca_locality_fit_through_the_gram_route_matches_the_covariance_route():
    images = low_rank_images(30, seed=5)
    fitted = da.PCALocalityDenoiser.from_dataset(images, show_progress=False, mask_threshold=0.0)
    flat = images.reshape(30, -1).double()
    eigvals, eigvecs = torch.linalg.eigh(torch.from_numpy(np.cov(flat.numpy(), rowvar=False, ddof=1)))
    by_covariance = da.PCALocalityDenoiser.from_config(fitted.config)
    by_covariance.load_state_dict(fitted.state_dict())
    by_covariance.eigvecs.copy_(eigvecs.flip(1))
    by_covariance.eigvals.copy_(eigvals.flip(0).clamp(min=0))
    x = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2)) * 0.5 + 0.3
    for t in (999, 500, 100, 0):
        torch.testing.assert_close(fitted.denoise(x, t), by_covariance.denoise(x, t), rtol=1e-4, atol=1e-5)


@pytest.fixture
def caplog_warnings():
    """Warnings logged by `kernels.moments` during the test."""
    with logged_warnings(moments_module.__name__) as records:
        yield records


def test_a_long_fit_is_announced_before_its_float64_work(monkeypatch, caplog_warnings):
    images = low_rank_images(120, seed=6)  # N >= D: the D x D route
    da.WienerDenoiser.from_dataset(images, show_progress=False, value_range=None)
    assert not caplog_warnings
    monkeypatch.setattr(moments_module, "LONG_FIT_SECONDS", 0.0)
    da.WienerDenoiser.from_dataset(images, show_progress=False, value_range=None)
    messages = [record.getMessage() for record in caplog_warnings]
    assert len(messages) == 2, messages
    assert "covariance of 120 images" in messages[0] and "min at 50 GFLOP/s" in messages[0]
    assert "Decomposing the 108 x 108 covariance" in messages[1] and "min at 20 GFLOP/s" in messages[1]
    caplog_warnings.clear()
    da.WienerDenoiser.from_dataset(images[:50], show_progress=False, value_range=None)  # N < D: Gram route
    assert not caplog_warnings


@pytest.mark.parametrize("threshold", [0.0, 0.02])
def test_locality_mask_leaves_out_zero_gain_directions_exactly(threshold):
    from diffusers_analytic.models.pca_mask import pca_locality_mask

    images = low_rank_images(30, seed=7)  # rank 29 < D = 108: 79 zero eigenvalues and zero columns
    fitted = da.PCALocalityDenoiser.from_dataset(images, show_progress=False, mask_threshold=threshold)
    vectors, values = fitted.eigvecs.double(), fitted.eigvals.double()
    assert int((values == 0).sum()) == 108 - 29
    for t in (900, 300, 0):
        a = float(fitted.alphas_cumprod[t])
        gains = a * values / (a * values + 1 - a)
        w = (vectors * gains) @ vectors.T  # the full product, zero columns included
        diagonal = w.diagonal()
        ratio = w / torch.where(diagonal.abs() < 1e-6, torch.ones_like(diagonal), diagonal)[:, None]  # (the guard)
        expected = ratio.float() if threshold == 0 else ratio.abs() >= threshold * ratio.abs().max()
        mask = pca_locality_mask(fitted.eigvecs, fitted.eigvals, a, threshold)
        if threshold == 0:
            torch.testing.assert_close(mask, expected, rtol=1e-5, atol=1e-6)
        else:
            assert torch.equal(mask, expected), t
