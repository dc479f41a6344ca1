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


# ---------------------------------------------------------------- the per-call fast paths, against the general ones


def test_integer_timesteps_read_the_table_exactly(gaussian_fit):
    _, denoiser = gaussian_fit
    alphas = denoiser.alphas_cumprod
    forms = [
        (417, None),
        (417.0, 3),
        (torch.tensor(417), 3),
        (torch.tensor(417, dtype=torch.int32), None),
        (torch.tensor([0, 417, 999]), 3),
        (torch.tensor([5, 7], dtype=torch.uint8), None),
        (torch.tensor([0, 417, 999], dtype=torch.float64), None),  # integral floats: the general path
    ]
    for timestep, batch_size in forms:
        a, b = denoiser.alpha_prod_at(timestep, batch_size)
        index = torch.as_tensor(timestep).reshape(-1).long().expand(batch_size or torch.as_tensor(timestep).numel())
        assert a.dtype == b.dtype == torch.float64 and a.device.type == "cpu"
        assert torch.equal(a, alphas[index]) and torch.equal(b, 1.0 - alphas[index]), timestep
    # Writing into a result leaves the table alone.
    a, _ = denoiser.alpha_prod_at(torch.tensor([3, 4]))
    a.zero_()
    assert denoiser.alpha_prod_at(3)[0].item() == alphas[3].item() > 0


@pytest.mark.parametrize(
    "timestep, batch_size, message",
    [
        (1000, None, "must lie in"),
        (-1, 2, "must lie in"),
        (torch.tensor([1, 1000]), 2, "must lie in"),
        (torch.tensor([1, 2, 3]), 2, "3 entries for a batch of 2"),
        (torch.tensor([[1]]), None, "0-d or a 1-d"),
        (torch.tensor(True), None, "integer or floating"),
        (True, None, "got bool"),
        (float("nan"), None, "finite"),
    ],
)
def test_bad_timesteps_keep_their_errors(gaussian_fit, timestep, batch_size, message):
    _, denoiser = gaussian_fit
    with pytest.raises(ValueError, match=message):
        denoiser.alpha_prod_at(timestep, batch_size)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32, torch.float64])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_samples_are_refused_in_every_dtype(gaussian_fit, dtype, bad):
    _, denoiser = gaussian_fit
    x = torch.randn(3, *SHAPE).to(dtype)
    x[1, 0, 2, 3] = bad
    with pytest.raises(ValueError, match="NaN or infinite"):
        denoiser.denoise(x, 10)


def float64_wiener(denoiser, x: torch.Tensor, a: float) -> torch.Tensor:
    """From the buffers, float64: mu + U diag(g - g_f) U^T v + g_f v (g = 0 where a lam + 1 - a <= 0)."""

    def shrink(lam):
        denominator = a * lam + 1 - a
        return torch.where(denominator > 0, a**0.5 * lam / denominator.clamp(min=1e-300), 0.0)

    mean, vecs, lam = denoiser.mean.double(), denoiser.eigvecs.double(), denoiser.eigvals.double()
    floor = denoiser.eigval_floor.double()
    v = x.reshape(len(x), -1).double() - a**0.5 * mean
    x0 = mean + shrink(floor) * v + ((v @ vecs) * (shrink(lam) - shrink(floor))) @ vecs.T
    return x0.reshape(x.shape)


def relative_error(out: torch.Tensor, expected: torch.Tensor) -> float:
    return float(torch.linalg.norm(out.double() - expected) / torch.linalg.norm(expected))


def test_cached_operator_follows_in_place_writes_dtype_changes_and_loading(gaussian_fit, tmp_path):
    data, fitted = gaussian_fit
    denoiser = da.WienerDenoiser.from_dataset(data, show_progress=False, value_range=None)
    x = torch.randn(4, *SHAPE)
    a = denoiser.alphas_cumprod[300].item()
    assert relative_error(denoiser.denoise(x, 300), float64_wiener(denoiser, x, a)) <= 1e-5
    before = denoiser.denoise(x, 300)
    for write in (
        lambda d: d.eigvals.mul_(3.0),
        lambda d: d.mean.add_(0.5),
        lambda d: d.eigvecs[:, 0].neg_(),
        lambda d: d.eigval_floor.fill_(0.1),
    ):
        write(denoiser)
        assert relative_error(denoiser.denoise(x, 300), float64_wiener(denoiser, x, a)) <= 1e-5
    assert relative_error(denoiser.denoise(x, 300), before.double()) > 1e-2
    denoiser.to(torch.float64)  # float64 buffers: float32 copies for the call, rebuilt from the new tensors
    assert relative_error(denoiser.denoise(x, 300), float64_wiener(denoiser, x, a)) <= 1e-5
    fitted.save_pretrained(tmp_path)
    denoiser.load_state_dict(da.WienerDenoiser.from_pretrained(tmp_path).state_dict())  # an in-place copy
    torch.testing.assert_close(denoiser.denoise(x, 300), fitted.denoise(x, 300), rtol=1e-5, atol=1e-6)


def test_cached_operator_is_built_once_when_threads_race(gaussian_fit):
    import threading

    data, _ = gaussian_fit
    denoiser = da.WienerDenoiser.from_dataset(data, show_progress=False, value_range=None)
    x = torch.randn(4, *SHAPE)
    expected = float64_wiener(denoiser, x, denoiser.alphas_cumprod[50].item())
    results, operators = [], []
    barrier = threading.Barrier(8)

    def call():
        barrier.wait()
        results.append(denoiser.denoise(x, 50))
        operators.append(denoiser._operator())

    threads = [threading.Thread(target=call) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 8 and all(relative_error(r, expected) <= 1e-5 for r in results)
    assert all(op is operators[0] for op in operators)


@pytest.mark.parametrize("copy_limit, blocks", [(0, 1), (1 << 20, 1), (0, 3), (1 << 20, 4)])
def test_both_basis_layouts_and_point_masses_match_float64(gaussian_fit, monkeypatch, copy_limit, blocks):
    """A schedule that starts at a = 1 and zero eigenvalues (shrinkage 0, no NaN); negative eigenvalues take the
    masked path; a per-sample batch of timesteps; the floor of a rank cut; the basis used as stored or as a
    transposed copy, in one GEMM or in blocks of eigenvectors side by side (with some left over)."""
    from diffusers_analytic.models import denoiser_wiener

    monkeypatch.setattr(denoiser_wiener, "_COPY_LIMIT", copy_limit)
    monkeypatch.setattr(denoiser_wiener, "_num_basis_blocks", lambda basis, batch_size: blocks)
    data, _ = gaussian_fit
    betas = [0.0] + torch.linspace(1e-4, 0.02, 999, dtype=torch.float64).tolist()
    denoiser = da.WienerDenoiser.from_dataset(data, trained_betas=betas, show_progress=False, value_range=None)
    assert denoiser.alphas_cumprod[0].item() == 1.0
    denoiser.eigvals[-3:] = 0.0
    x = torch.randn(5, *SHAPE)
    for t in (0, 1, 17, 500, 999):
        a = denoiser.alphas_cumprod[t].item()
        out = denoiser.denoise(x, t)
        assert torch.isfinite(out).all() and relative_error(out, float64_wiener(denoiser, x, a)) <= 1e-5, t
    mixed = torch.tensor([0, 999, 17, 17, 500])
    out = denoiser.denoise(x, mixed)
    for b, t in enumerate(mixed.tolist()):
        expected = float64_wiener(denoiser, x[b : b + 1], denoiser.alphas_cumprod[t].item())
        assert relative_error(out[b : b + 1], expected) <= 1e-5, t
    denoiser.eigvals[-1] = -0.5  # a buffer no fit writes: a lam + 1 - a < 0 at large a gives shrinkage 0
    for t in (0, 100, 999):
        a = denoiser.alphas_cumprod[t].item()
        assert relative_error(denoiser.denoise(x, t), float64_wiener(denoiser, x, a)) <= 1e-5, t
    denoiser.eigval_floor.fill_(0.05)  # the floor of a rank cut
    for t in (0, 100, 999):
        a = denoiser.alphas_cumprod[t].item()
        assert relative_error(denoiser.denoise(x, t), float64_wiener(denoiser, x, a)) <= 1e-5, t


def test_every_integer_timestep_matches_float64_on_digits(digits):
    denoiser = da.WienerDenoiser.from_dataset(digits.images, show_progress=False)
    x = torch.randn(8, 1, 8, 8, generator=torch.Generator().manual_seed(0)) * 1.5
    timesteps = torch.arange(0, 1000, 37)
    out = denoiser.denoise(x.expand(len(timesteps), 8, 1, 8, 8).reshape(-1, 1, 8, 8), timesteps.repeat_interleave(8))
    for i, t in enumerate(timesteps.tolist()):
        expected = float64_wiener(denoiser, x, denoiser.alphas_cumprod[t].item())
        assert relative_error(out[8 * i : 8 * i + 8], expected) <= 1e-5, t


@pytest.mark.parametrize("data", ["digits", "patches"])
def test_fit_matches_torch_float64_eigh_at_every_noise_level(data):
    """The fitted posterior mean against the same moments decomposed by `torch.linalg.eigh` in float64, t = 0..999."""
    from diffusers_analytic.kernels.moments import fit_moments

    images = (
        da.load_builtin(data).images if data == "digits" else da.load_builtin(data, size=8, num_images=1500).images
    )
    denoiser = da.WienerDenoiser.from_dataset(images, show_progress=False)
    moments, _ = fit_moments(images, show_progress=False)
    eigvals, eigvecs = torch.linalg.eigh(moments.covariance())
    x = torch.randn(4, denoiser.mean.numel(), generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    alphas = denoiser.alphas_cumprod[:, None, None]  # [T, 1, 1]: every noise level at once

    def posterior_mean(mean, vecs, lam):
        gain = alphas.sqrt() * lam / (alphas * lam + 1 - alphas)  # [T, 1, D]
        return mean + ((x - alphas.sqrt() * mean) @ vecs * gain) @ vecs.T  # [T, 4, D]

    expected = posterior_mean(moments.mean, eigvecs, eigvals.clamp(min=0.0))
    ours = posterior_mean(denoiser.mean.double(), denoiser.eigvecs.double(), denoiser.eigvals.double())
    errors = torch.linalg.norm(ours - expected, dim=(1, 2)) / torch.linalg.norm(expected, dim=(1, 2))
    assert errors.max() <= 1e-4, (errors.argmax(), errors.max())
    for t in (0, 1, 500, 999):
        out = denoiser.denoise(x.float().reshape(4, *denoiser.sample_shape), t).reshape(4, -1)
        assert relative_error(out, expected[t]) <= 1e-5, t


def test_moving_the_model_drops_the_cached_operator(digits):
    denoiser = da.WienerDenoiser.from_dataset(digits, show_progress=False)
    x = torch.randn(2, 1, 8, 8)
    expected = denoiser.denoise(x, 300)
    assert "_operator_cache" in denoiser.__dict__
    denoiser.to(torch.float64)
    assert "_operator_cache" not in denoiser.__dict__  # the old float32 buffers are not kept alive
    torch.testing.assert_close(denoiser.to(torch.float32).denoise(x, 300), expected)


def test_basis_blocks_follow_the_batch_and_the_basis_size():
    from diffusers_analytic.models import denoiser_wiener

    threads = torch.get_num_threads()
    large, small = torch.empty(3072, 3072), torch.empty(64, 64)
    assert denoiser_wiener._num_basis_blocks(large, 8) == min(threads, 9)
    assert denoiser_wiener._num_basis_blocks(large, denoiser_wiener.BASIS_BLOCK_BATCH + 1) == 1
    assert denoiser_wiener._num_basis_blocks(small, 8) == 1
    assert torch.get_num_threads() == threads
