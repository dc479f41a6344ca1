"""Samples against the training set: Fréchet distance vs scipy, nearest neighbours vs brute force, the ratio test,
and the digits check (the optimal denoiser copies training images, the Wiener denoiser does not)."""

import numpy as np
import pytest
import scipy.linalg
import torch

import diffusers_analytic as da
from diffusers_analytic.data import to_model_space
from diffusers_analytic.evaluation import (
    evaluate_samples,
    frechet_distance,
    frechet_distance_from_statistics,
    gaussian_statistics,
    memorization,
    nearest_neighbors,
    nearest_other_distances,
)
from diffusers_analytic.utils.seeding import generators_for_indices


def scipy_frechet_distance(a: np.ndarray, b: np.ndarray) -> float:
    """The textbook formula with scipy's general matrix square root (independent of the eigh-based code)."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    mean_a, mean_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    root = scipy.linalg.sqrtm(cov_a @ cov_b).real
    return float(((mean_a - mean_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2.0 * np.trace(root))


def random_features(n, d, seed, scale=1.0, shift=0.0):
    generator = torch.Generator().manual_seed(seed)
    mixing = torch.randn(d, d, generator=generator) / d**0.5
    return (torch.randn(n, d, generator=generator) @ mixing) * scale + shift


# (N_a, N_b, D): both covariances [D, D] (N >= D), and the [n, n] path of a set smaller than D, either way round.
@pytest.mark.parametrize("na, nb, dim", [(400, 300, 16), (12, 300, 40), (300, 7, 40), (50, 60, 100)])
def test_frechet_distance_matches_scipy(na, nb, dim):
    a = random_features(na, dim, seed=0)
    b = random_features(nb, dim, seed=1, scale=1.5, shift=0.3)
    expected = scipy_frechet_distance(a.numpy(), b.numpy())
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(expected, rel=1e-6)  # symmetric
    assert frechet_distance(a.numpy(), b.numpy(), chunk_size=7) == pytest.approx(expected, rel=1e-6)


def test_frechet_distance_from_statistics_matches_scipy():
    a, b = random_features(500, 24, seed=2), random_features(400, 24, seed=3, scale=0.7)
    mean_a, cov_a = gaussian_statistics(a, chunk_size=33)
    mean_b, cov_b = gaussian_statistics(b)
    torch.testing.assert_close(cov_a, torch.from_numpy(np.cov(a.double().numpy(), rowvar=False)))
    expected = scipy_frechet_distance(a.numpy(), b.numpy())
    assert frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b) == pytest.approx(expected, rel=1e-8)


@pytest.mark.parametrize("na, dim", [(200, 16), (10, 64)])
def test_frechet_distance_of_a_set_with_itself_and_its_translate(na, dim):
    a = random_features(na, dim, seed=4)
    assert frechet_distance(a, a) == pytest.approx(0.0, abs=1e-9)
    shift = torch.linspace(-0.5, 0.5, dim)
    # Same covariance, shifted mean: FD = ||shift||^2 exactly.
    assert frechet_distance(a, a + shift) == pytest.approx(float(shift.double().square().sum()), rel=1e-6)


def test_frechet_distance_reads_uint8_in_model_space_and_refuses_bad_input():
    images = torch.randint(0, 256, (40, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(5))
    other = images.flip(0)[:30]
    assert frechet_distance(images, other) == pytest.approx(
        frechet_distance(to_model_space(images, torch.float64), to_model_space(other, torch.float64)), rel=1e-9
    )
    with pytest.raises(ValueError, match="at least 2 items"):
        frechet_distance(images[:1], images)
    with pytest.raises(ValueError, match="values per item"):
        frechet_distance(torch.zeros(5, 3), torch.zeros(5, 4))
    with pytest.raises(ValueError, match="NaN"):
        frechet_distance(torch.full((5, 3), float("nan")), torch.zeros(5, 3))


@pytest.mark.parametrize("k, chunk_size, batch_size", [(1, 1000, 1000), (2, 37, 5), (5, 64, 17)])
def test_nearest_neighbors_match_brute_force(k, chunk_size, batch_size):
    generator = torch.Generator().manual_seed(6)
    samples, reference = torch.randn(60, 3, 4, 4, generator=generator), torch.randn(500, 3, 4, 4, generator=generator)
    found = nearest_neighbors(samples, reference, k=k, chunk_size=chunk_size, batch_size=batch_size)
    brute = torch.cdist(samples.reshape(60, -1).double(), reference.reshape(500, -1).double()).topk(k, largest=False)
    assert found.indices.shape == (60, k) and found.distances.dtype == torch.float32
    torch.testing.assert_close(found.indices, brute.indices)
    torch.testing.assert_close(found.distances.double(), brute.values, rtol=1e-6, atol=1e-6)


def test_nearest_neighbors_uint8_cosine_and_a_large_reference():
    generator = torch.Generator().manual_seed(7)
    reference = torch.randint(0, 256, (3000, 1, 8, 8), dtype=torch.uint8, generator=generator)
    samples = reference[[5, 2999, 1234]].clone()
    samples[0, 0, 0, 0] = 0  # nearly a copy
    found = nearest_neighbors(samples, reference, k=3, chunk_size=256)
    brute = torch.cdist(
        to_model_space(samples, torch.float64).reshape(3, -1),
        to_model_space(reference, torch.float64).reshape(3000, -1),
    )
    torch.testing.assert_close(found.indices, brute.topk(3, largest=False).indices)
    assert found.indices[:, 0].tolist() == [5, 2999, 1234] and found.distances[1:, 0].eq(0).all()

    features, queries = torch.randn(800, 12, generator=generator), torch.randn(20, 12, generator=generator)
    cosine = nearest_neighbors(queries, features, k=2, metric="cosine", chunk_size=100)
    similarity = (
        torch.nn.functional.normalize(queries.double(), dim=1)
        @ torch.nn.functional.normalize(features.double(), dim=1).T
    )
    best = similarity.topk(2, dim=1)
    torch.testing.assert_close(cosine.indices, best.indices)
    torch.testing.assert_close(cosine.distances.double(), 1 - best.values, rtol=1e-5, atol=1e-6)

    # 50000 reference items, streamed: scores are [batch, k + chunk] at a time, never [B, M].
    big = torch.randn(50_000, 4, generator=generator)
    picked = nearest_neighbors(big[[0, 49_999]] + 1e-4, big, k=2, chunk_size=4096)
    assert picked.indices[:, 0].tolist() == [0, 49_999]


def test_memorization_ratio_test():
    generator = torch.Generator().manual_seed(8)
    reference = torch.randn(300, 16, generator=generator)
    itself = memorization(reference, reference)
    assert itself.fraction == 1.0 and itself.memorized.all() and itself.ratio == pytest.approx(1 / 3)
    # An image stored twice: d_1 = d_2 = 0 still counts as a copy.
    doubled = torch.cat([reference, reference[:3]])
    assert memorization(reference[:3], doubled).fraction == 1.0
    fresh = memorization(torch.randn(50, 16, generator=generator), reference)
    assert fresh.fraction == 0.0
    near_copies = reference[:10] + 0.01 * torch.randn(10, 16, generator=generator)
    assert memorization(near_copies, reference, chunk_size=64).fraction == 1.0
    with pytest.raises(ValueError, match="`ratio` must be in"):
        memorization(reference, reference, ratio=0.0)
    with pytest.raises(ValueError, match="at least 2"):
        memorization(reference, reference[:1])


def test_nearest_other_distances_skip_the_query_itself():
    generator = torch.Generator().manual_seed(9)
    reference = torch.randn(40, 6, generator=generator)
    reference[7] = reference[3]  # a duplicate pair
    queries, distances = nearest_other_distances(reference, max_queries=None, chunk_size=9)
    brute = torch.cdist(reference.double(), reference.double()).fill_diagonal_(float("inf")).min(dim=1).values
    assert queries.tolist() == list(range(40))
    torch.testing.assert_close(distances.double(), brute, rtol=1e-6, atol=1e-6)
    assert distances[3] == 0 and distances[7] == 0
    queries, distances = nearest_other_distances(reference, max_queries=5)
    assert queries.tolist() == [0, 10, 20, 29, 39] and len(distances) == 5


@pytest.fixture(scope="module")
def digit_samples(digits):
    """16 samples (20 DDIM steps) of the optimal and of the Wiener denoiser of the digits, in model space."""
    samples = {}
    for name, denoiser_class in (("optimal", da.OptimalDenoiser), ("wiener", da.WienerDenoiser)):
        pipe = da.AnalyticDDIMPipeline(unet=denoiser_class.from_dataset(digits, show_progress=False))
        pipe.set_progress_bar_config(disable=True)
        images = pipe(
            batch_size=16, generator=generators_for_indices(0, range(16)), num_inference_steps=20, output_type="pt"
        ).images
        samples[name] = images * 2 - 1
    return samples


def test_optimal_denoiser_memorizes_the_digits_and_wiener_does_not(digits, digit_samples):
    optimal = evaluate_samples(digit_samples["optimal"], digits)
    wiener = evaluate_samples(digit_samples["wiener"], digits)
    assert optimal.memorization.fraction >= 0.9
    assert wiener.memorization.fraction <= 0.1
    metrics = optimal.to_dict()
    assert metrics["num_samples"] == 16 and metrics["num_reference"] == 1797 and metrics["memorized_fraction"] >= 0.9
    reference_scale = metrics["nearest_distance"]["reference"]
    assert reference_scale["num_queries"] == 1797 and reference_scale["min"] > 0  # no duplicate digits
    assert metrics["nearest_distance"]["samples"]["max"] < 1e-3 < reference_scale["min"]
    assert wiener.to_dict()["nearest_distance"]["samples"]["min"] > reference_scale["min"]
    assert metrics["fd_pixels"] > 0 and "fd_features" not in metrics


def test_evaluate_samples_refuses_another_size(digits):
    with pytest.raises(ValueError, match="resize the samples"):
        evaluate_samples(torch.zeros(4, 1, 16, 16), digits)
    itself = evaluate_samples(digits.images[:200], digits.images[:200], max_reference_queries=50)
    assert itself.memorization.fraction == 1.0 and itself.fd_pixels == pytest.approx(0.0, abs=1e-9)
