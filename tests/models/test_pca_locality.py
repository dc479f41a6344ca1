"""PCA-locality denoiser: the closed form against an independent float64 implementation, invariants, storage."""

import math

import pytest
import torch
from diffusers import DDIMScheduler

import diffusers_analytic as da
from diffusers_analytic.data import load_builtin, to_model_space
from diffusers_analytic.models.denoiser_pca_locality import PCALocalityDenoiser
from diffusers_analytic.models.pca_mask import locality_tiles, symmetric_product

TIMESTEPS = (900, 500, 100, 20)
THRESHOLDS = (0.0, 0.02, 0.05)


# ---------------------------------------------------------------------------------------------- float64 reference
def reference_mask(denoiser, alpha_prod, threshold):
    """The formula of docs/math.md, in float64, from the denoiser's stored eigenbasis."""
    eigvecs, eigvals = denoiser.eigvecs.double(), denoiser.eigvals.double()
    gains = alpha_prod * eigvals / (alpha_prod * eigvals + 1 - alpha_prod)
    wiener = eigvecs @ torch.diag(gains) @ eigvecs.T
    diagonal = wiener.diagonal()
    ratio = wiener / torch.where(diagonal.abs() < 1e-6, torch.ones_like(diagonal), diagonal)[:, None]
    if threshold == 0:
        return ratio
    return (ratio.abs() >= threshold * ratio.abs().max()).double()


def reference_x0(images, x_t, alpha_prod, mask, temperature=1.0):
    """x0_hat[p] = sum_i softmax_i(-d_p(i) / (2 (1 - a) tau)) y_i[p], d_p(i) = sum_q M[q, p] (x[q] - sqrt(a) y_i[q])^2,
    directly: B N D^2 multiply-adds, float64, one softmax over all N."""
    x = x_t.double().reshape(len(x_t), -1)
    out = []
    for x_b in x:
        distance = ((x_b[None] - math.sqrt(alpha_prod) * images) ** 2) @ mask  # [N, D]
        weights = torch.softmax(-distance / (2 * (1 - alpha_prod) * temperature), dim=0)
        out.append((weights * images).sum(0))
    return torch.stack(out)


def stored_images(denoiser):
    return to_model_space(denoiser.images, torch.float64).reshape(len(denoiser.images), -1)


def noisy(images, alpha_prod, generator, count):
    """x_t from the first `count` stored images plus noise."""
    clean = images[:count].float()
    noise = torch.randn(clean.shape, generator=generator)
    return math.sqrt(alpha_prod) * clean + math.sqrt(1 - alpha_prod) * noise


def rel_err(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.fixture(scope="module")
def digits_denoiser():
    return PCALocalityDenoiser.from_dataset(load_builtin("digits"), show_progress=False, chunk_size=500)


@pytest.fixture(scope="module")
def patch_denoiser():
    data = load_builtin("patches", size=16, num_images=600)
    return PCALocalityDenoiser.from_dataset(data, show_progress=False, chunk_size=256)


def with_threshold(denoiser, threshold):
    denoiser.register_to_config(mask_threshold=threshold)
    return denoiser


# ---------------------------------------------------------------------------------------------- exactness
@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_digits_match_float64_reference(digits_denoiser, threshold):
    denoiser = with_threshold(digits_denoiser, threshold)
    images = stored_images(denoiser)
    generator = torch.Generator().manual_seed(0)
    for t in TIMESTEPS:
        alpha_prod = float(denoiser.alphas_cumprod[t])
        x_t = noisy(images, alpha_prod, generator, 4)
        mask = reference_mask(denoiser, alpha_prod, threshold)
        if threshold > 0:  # the binary mask itself is exact
            assert torch.equal(denoiser.locality_mask(alpha_prod).mask, mask.bool())
        out = denoiser.denoise(x_t.reshape(4, 1, 8, 8), t).reshape(4, -1)
        assert rel_err(out, reference_x0(images, x_t, alpha_prod, mask)) <= 1e-4, (t, threshold)


@pytest.mark.parametrize("threshold", THRESHOLDS)
def test_patches_match_float64_reference(patch_denoiser, threshold):
    denoiser = with_threshold(patch_denoiser, threshold)
    images = stored_images(denoiser)
    generator = torch.Generator().manual_seed(1)
    for t in TIMESTEPS:
        alpha_prod = float(denoiser.alphas_cumprod[t])
        x_t = noisy(images, alpha_prod, generator, 2)
        mask = reference_mask(denoiser, alpha_prod, threshold)
        if threshold > 0:
            assert torch.equal(denoiser.locality_mask(alpha_prod).mask, mask.bool())
        out = denoiser.denoise(x_t.reshape(2, 3, 16, 16), t).reshape(2, -1)
        assert rel_err(out, reference_x0(images, x_t, alpha_prod, mask)) <= 1e-4, (t, threshold)


@pytest.mark.parametrize("variant, timesteps", [("direct", (20,)), ("complement", (500,))])
def test_sparse_tilings_are_exact(patch_denoiser, variant, timesteps):
    """Tiles over the mask's support and over its complement give the dense result (forced, 2x2 pixel tiles)."""
    denoiser = with_threshold(patch_denoiser, 0.05)
    images = stored_images(denoiser)
    generator = torch.Generator().manual_seed(2)
    for t in timesteps:
        alpha_prod = float(denoiser.alphas_cumprod[t])
        mask = denoiser.locality_mask(alpha_prod).mask
        entry = denoiser._prepare_mask(mask, 2, paths=("tiles",), variants=(variant,), max_tile_pixels=12)
        assert entry.path == "tiles" and len(entry.tiles) == 64
        assert all(
            q_idx is not None and complement == (variant == "complement") for _, q_idx, complement in entry.tiles
        )
        assert sum(len(q_idx) for _, q_idx, _ in entry.tiles) < len(entry.tiles) * mask.shape[0]  # really sparse
        x_t = noisy(images, alpha_prod, generator, 2)
        out = denoiser._denoise_group(x_t, alpha_prod, 1 - alpha_prod, mask=entry)
        assert rel_err(out, reference_x0(images, x_t, alpha_prod, mask.double())) <= 1e-4, (t, variant)


@pytest.mark.parametrize("dim, block_rows", [(64, 512), (90, 16), (100, 33), (7, 2)])
def test_symmetric_product_equals_the_full_product(dim, block_rows):
    # U diag(g) U^T from blocks on and above the diagonal, mirrored: the full float64 product to rounding
    generator = torch.Generator().manual_seed(dim)
    eigvecs = torch.linalg.qr(torch.randn(dim, dim, generator=generator, dtype=torch.float64))[0]
    gains = torch.rand(dim, generator=generator, dtype=torch.float64)
    out = symmetric_product(eigvecs * gains, eigvecs, block_rows=block_rows)
    expected = eigvecs @ torch.diag(gains) @ eigvecs.T
    assert float((out - expected).abs().max()) <= 1e-14


def test_tiles_cover_every_column_support():
    generator = torch.Generator().manual_seed(3)
    shape = (3, 6, 5)
    dim = 90
    mask = torch.rand(dim, dim, generator=generator) < 0.1
    for variants in (("dense",), ("direct",), ("complement",), ("dense", "direct", "complement")):
        tiles = locality_tiles(mask, shape, batch_size=4, variants=variants)
        outputs = torch.cat([p_idx for p_idx, _, _ in tiles])
        assert torch.equal(outputs.sort().values, torch.arange(dim))  # every output pixel exactly once
        for p_idx, q_idx, complement in tiles:
            columns = ~mask[:, p_idx] if complement else mask[:, p_idx]
            if q_idx is not None:
                outside = torch.ones(dim, dtype=torch.bool)
                outside[q_idx] = False
                assert not columns[outside].any()


def test_temperature_scales_the_logits(digits_denoiser):
    denoiser = with_threshold(digits_denoiser, 0.02)
    images = stored_images(denoiser)
    tempered = PCALocalityDenoiser.from_config(denoiser.config, temperature=2.5)
    tempered.load_state_dict(denoiser.state_dict())
    alpha_prod = float(denoiser.alphas_cumprod[100])
    x_t = noisy(images, alpha_prod, torch.Generator().manual_seed(4), 3)
    mask = reference_mask(denoiser, alpha_prod, 0.02)
    out = tempered.denoise(x_t.reshape(3, 1, 8, 8), 100).reshape(3, -1)
    assert rel_err(out, reference_x0(images, x_t, alpha_prod, mask, temperature=2.5)) <= 1e-4


# ---------------------------------------------------------------------------------------------- invariants
def optimal_x0(images, x_t, alpha_prod):
    """The optimal (empirical Bayes) posterior mean, float64."""
    x = x_t.double().reshape(len(x_t), -1)
    distance = torch.cdist(x, math.sqrt(alpha_prod) * images) ** 2  # [B, N]
    return torch.softmax(-distance / (2 * (1 - alpha_prod)), dim=1) @ images


def test_all_ones_mask_is_the_optimal_denoiser(patch_denoiser):
    denoiser = with_threshold(patch_denoiser, 0.02)
    images = stored_images(denoiser)
    generator = torch.Generator().manual_seed(5)
    # at t = 900 the binarised mask of natural patches is all ones: the shortcut path
    alpha_prod = float(denoiser.alphas_cumprod[900])
    assert denoiser.locality_mask(alpha_prod).all_ones
    x_t = noisy(images, alpha_prod, generator, 2)
    out = denoiser.denoise(x_t.reshape(2, 3, 16, 16), 900).reshape(2, -1)
    assert rel_err(out, optimal_x0(images, x_t, alpha_prod)) <= 1e-5
    # an all-ones mask given to the tiled path (dense tiles) at a low noise level
    alpha_prod = float(denoiser.alphas_cumprod[100])
    ones = torch.ones(768, 768, dtype=torch.bool)
    assert denoiser._prepare_mask(ones).all_ones
    entry = denoiser._prepare_mask(ones.float(), 2)  # the same mask as a (soft) float mask: dense tiles
    assert not entry.all_ones and entry.tiles
    x_t = noisy(images, alpha_prod, generator, 2)
    out = denoiser._denoise_group(x_t, alpha_prod, 1 - alpha_prod, mask=entry)
    assert rel_err(out, optimal_x0(images, x_t, alpha_prod)) <= 1e-4


def test_identity_mask_gives_independent_pixel_posteriors(patch_denoiser):
    denoiser = patch_denoiser
    images = stored_images(denoiser)
    alpha_prod = float(denoiser.alphas_cumprod[300])
    x_t = noisy(images, alpha_prod, torch.Generator().manual_seed(6), 2).double()
    entry = denoiser._prepare_mask(torch.eye(768, dtype=torch.bool), 2)
    out = denoiser._denoise_group(x_t.float(), alpha_prod, 1 - alpha_prod, mask=entry)
    # per pixel p: w_p(i) ~ exp(-(x[p] - sqrt(a) y_i[p])^2 / (2 (1 - a))), x0[p] = sum_i w_p(i) y_i[p]
    logits = -((x_t[:, None, :] - math.sqrt(alpha_prod) * images[None]) ** 2) / (2 * (1 - alpha_prod))  # [B, N, D]
    expected = (torch.softmax(logits, dim=1) * images[None]).sum(1)
    assert rel_err(out, expected) <= 1e-5


def per_batch_average_x0(images, x_t, alpha_prod, mask, batch):
    """The reference implementation's estimate: the mean over data batches of each batch's own softmax average."""
    parts = [reference_x0(images[s : s + batch], x_t, alpha_prod, mask) for s in range(0, len(images), batch)]
    return torch.stack(parts).mean(0)


def test_chunk_size_and_data_order_do_not_change_the_result(digits_denoiser):
    denoiser = with_threshold(digits_denoiser, 0.02)
    images = stored_images(denoiser)
    generator = torch.Generator().manual_seed(7)
    permuted = PCALocalityDenoiser.from_config(denoiser.config)
    permuted.load_state_dict(denoiser.state_dict())
    permuted.images.copy_(denoiser.images[torch.randperm(len(images), generator=generator)])
    for t in (900, 20):
        alpha_prod = float(denoiser.alphas_cumprod[t])
        x_t = noisy(images, alpha_prod, generator, 4).reshape(4, 1, 8, 8)
        exact = reference_x0(images, x_t, alpha_prod, reference_mask(denoiser, alpha_prod, 0.02))
        results = [
            denoiser._denoise_group(x_t.reshape(4, -1), alpha_prod, 1 - alpha_prod, chunk_size=c)
            for c in (7, 512, 1797)
        ]
        results.append(permuted.denoise(x_t, t).reshape(4, -1))
        for result in results:
            assert rel_err(result, exact) <= 1e-4
        # averaging per-batch softmaxes (batches of 512) is measurably different from the exact one-batch result
        assert (
            rel_err(
                per_batch_average_x0(images, x_t, alpha_prod, reference_mask(denoiser, alpha_prod, 0.02), 512), exact
            )
            > 1e-2
        )


# ---------------------------------------------------------------------------------------------- storage, sampling
def test_save_load_and_sampling(tmp_path, digits_denoiser):
    denoiser = with_threshold(digits_denoiser, 0.02)
    assert denoiser.images.dtype == torch.uint8 and denoiser.labels is not None
    pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path)
    loaded = da.AnalyticDDIMPipeline.from_pretrained(tmp_path)
    assert isinstance(loaded.unet, PCALocalityDenoiser)
    for name in ("images", "labels", "eigvecs", "eigvals", "mean"):
        assert getattr(loaded.unet, name).dtype == getattr(denoiser, name).dtype
        assert torch.equal(getattr(loaded.unet, name), getattr(denoiser, name)), name
    x_t = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    assert torch.equal(loaded.unet.denoise(x_t, 300), denoiser.denoise(x_t, 300))

    out = loaded(
        batch_size=3,
        num_inference_steps=10,
        generator=torch.Generator().manual_seed(0),
        output_type="latent",
        return_intermediates=True,
    )
    assert torch.isfinite(out.images).all()
    assert out.images.abs().max() <= 1 + 1e-5  # the last x0_hat: a per-pixel convex combination of data
    assert all(x0.abs().max() <= 1 + 1e-5 for x0 in out.trajectory_x0)


def test_class_conditional_posterior(digits_denoiser):
    denoiser = with_threshold(digits_denoiser, 0.02)
    images = stored_images(denoiser)
    alpha_prod = float(denoiser.alphas_cumprod[500])
    x_t = noisy(images, alpha_prod, torch.Generator().manual_seed(9), 2)
    labels = torch.tensor([3, 7])
    out = denoiser.denoise(x_t.reshape(2, 1, 8, 8), 500, class_labels=labels).reshape(2, -1)
    mask = reference_mask(denoiser, alpha_prod, 0.02)
    for b, label in enumerate(labels.tolist()):
        members = images[denoiser.labels == label]
        assert rel_err(out[b : b + 1], reference_x0(members, x_t[b : b + 1], alpha_prod, mask)) <= 1e-4
    with pytest.raises(ValueError, match="Unknown class labels"):
        denoiser.denoise(x_t.reshape(2, 1, 8, 8), 500, class_labels=[3, 11])


def test_registry_and_public_name():
    assert da.get_denoiser_class("pca_locality") is da.PCALocalityDenoiser is PCALocalityDenoiser


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    "config, message",
    [
        ({"mask_threshold": -0.1}, "mask_threshold"),
        ({"mask_threshold": 1.5}, "mask_threshold"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"storage_dtype": "int16"}, "storage_dtype"),
    ],
)
def test_bad_config(config, message):
    data = torch.rand(4, 1, 4, 4) * 2 - 1
    with pytest.raises(ValueError, match=message):
        PCALocalityDenoiser.from_dataset(data, show_progress=False, **config)


def test_bad_data():
    with pytest.raises(ValueError, match="at least 2 images"):
        PCALocalityDenoiser.from_dataset(torch.zeros(1, 1, 4, 4), show_progress=False)
    with pytest.raises(ValueError, match="at least 2 images"):
        PCALocalityDenoiser(sample_size=4, in_channels=1, num_images=1)
    with pytest.raises(ValueError, match="NaN"):
        PCALocalityDenoiser.from_dataset(torch.full((3, 1, 4, 4), float("nan")), show_progress=False)
    denoiser = PCALocalityDenoiser.from_dataset(torch.rand(5, 1, 4, 4) * 2 - 1, show_progress=False)
    assert denoiser.images.dtype == torch.float32
    with pytest.raises(ValueError, match="fitted without labels"):
        denoiser.denoise(torch.zeros(1, 1, 4, 4), 10, class_labels=[0])
    with pytest.raises(ValueError, match="timestep"):
        denoiser.denoise(torch.zeros(1, 1, 4, 4), 1000)


def test_cli_fit(tmp_path):
    from diffusers_analytic.commands.cli import main

    output = tmp_path / "pipe"
    main(
        [
            "fit",
            "--method",
            "pca_locality",
            "--data",
            "digits",
            "--output-dir",
            str(output),
            "--config",
            "mask_threshold=0.05",
        ]
    )
    loaded = da.AnalyticDDIMPipeline.from_pretrained(output)
    assert isinstance(loaded.unet, PCALocalityDenoiser)
    assert loaded.unet.config.mask_threshold == 0.05 and loaded.unet.images.dtype == torch.uint8
    assert loaded.unet.config.num_images == 1797
