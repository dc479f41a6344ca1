r"""How do generated images relate to the training set? Nearest training images, memorization and Fréchet distances.

- **Nearest neighbours** ([`nearest_neighbors`]): the k training images closest to each sample in L2 (images in model
  space `[-1, 1]`, all D = C * H * W values) or in cosine distance (features), exact, streamed over the reference in
  chunks with a running top-k: memory is `[batch_size, k + chunk_size]` scores whatever the number of images.
- **Memorization** ([`memorization`]): the ratio test of Yoon et al. (2023) / Carlini et al. (2023). A sample is a
  copy of a training image when its nearest training image is much closer than the second nearest,

      d_1 <= ratio * d_2,   ratio = 1/3 by default,

  and `memorized_fraction` is the fraction of samples that pass. The optimal (empirical) denoiser copies training
  images exactly (fraction ~1); a Gaussian (Wiener) denoiser's samples are near no training image (fraction ~0).
- **Fréchet distance** ([`frechet_distance`]): the squared 2-Wasserstein distance between Gaussians fitted to two
  sets, computed in float64,

      FD = ||mu_a - mu_b||^2 + tr(S_a) + tr(S_b) - 2 tr( (S_a^{1/2} S_b S_a^{1/2})^{1/2} ),

  with the matrix square roots from symmetric eigendecompositions (negative rounding eigenvalues clamped at 0). In
  pixel space this is FD_pixels; in an encoder's features (e.g. DINOv2, [`~evaluation.features.FeatureEncoder`])
  it is FD_DINOv2 (Stein et al., 2023), FID with Inception features.
- [`evaluate_samples`] computes all of them for a set of samples and a reference set -> [`SampleEvaluation`], whose
  `to_dict()` is the `metrics.json` of `diffusers-analytic evaluate`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from ..data import ImageSet, to_model_space
from ..kernels.moments import StreamingMoments
from ..kernels.stored_images import StoredImageStats, image_chunks

logger = logging.get_logger(__name__)

DEFAULT_MEMORIZATION_RATIO = 1.0 / 3.0
METRICS = ("l2", "cosine")


# ---------------------------------------------------------------------------------------------- inputs
def _rows(data, name: str) -> torch.Tensor:
    """A tensor / array / [`ImageSet`] `[N, ...]` -> a `[N, D]` view (uint8 stays uint8, others become floating)."""
    if isinstance(data, ImageSet):
        data = data.images
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if not isinstance(data, torch.Tensor):
        raise ValueError(f"`{name}` must be a tensor or array [N, ...], got a {type(data).__name__}.")
    if data.ndim < 2:
        raise ValueError(f"`{name}` must be a batch [N, ...] of at least 2 dimensions, got shape {list(data.shape)}.")
    if data.dtype != torch.uint8 and not data.is_floating_point():
        data = data.to(torch.float32)
    if data.is_floating_point() and not torch.isfinite(data).all():
        raise ValueError(f"`{name}` contains NaN or infinite values; remove them before scoring.")
    return data.reshape(len(data), -1)


def _check_pair(samples: torch.Tensor, reference: torch.Tensor, min_reference: int) -> None:
    if len(samples) == 0:
        raise ValueError("`samples` is empty; pass at least one sample.")
    if len(reference) < min_reference:
        raise ValueError(f"`reference` has {len(reference)} images; this needs at least {min_reference}.")
    if samples.shape[1] != reference.shape[1]:
        raise ValueError(
            f"`samples` have {samples.shape[1]} values each and `reference` {reference.shape[1]}; resize the samples "
            "to the reference's size (the `evaluate` command does it) or pass features of the same encoder."
        )


def _unit_rows(rows: torch.Tensor) -> torch.Tensor:
    rows = to_model_space(rows, torch.float32)
    return rows / rows.norm(dim=1, keepdim=True).clamp(min=1e-12)


# ---------------------------------------------------------------------------------------------- nearest neighbours
@dataclass
class Neighbors:
    """
    The k nearest reference items of each sample, nearest first.

    Args:
        distances (`torch.Tensor`): float32 `[B, k]`: L2 distances (model space), or cosine distances `1 - cos`.
        indices (`torch.Tensor`): int64 `[B, k]`, indices into the reference.
    """

    distances: torch.Tensor
    indices: torch.Tensor


def nearest_neighbors(
    samples,
    reference,
    k: int = 2,
    metric: str = "l2",
    batch_size: int = 1024,
    chunk_size: int = 4096,
    device: torch.device | str | None = None,
    show_progress: bool = False,
) -> Neighbors:
    r"""
    The `k` nearest reference items of each sample, exact, streamed over the reference: no `[B, M]` matrix.

    As in [`~kernels.empirical.nearest_indices`], with mu the reference mean and y' = y - mu, the score
    `||y'_i||^2 - 2 (x - mu).y_i` differs from `||x - y_i||^2` by a per-row constant: one GEMM per chunk of
    `chunk_size` reference items, then `torch.topk` over `[B, k + chunk_size]` keeps the running best k. The k found
    are re-scored exactly in float64 and sorted, so the distances are exact and the order is that of float32 scores
    (ties and near-ties within float32 rounding may swap).

    Args:
        samples: `[B, ...]` images (uint8 `[0, 255]` or float model space) or features; a tensor, array or `ImageSet`.
        reference: `[M, ...]` of the same size per item (M >= k).
        k (`int`): neighbours per sample.
        metric (`str`): `"l2"` (Euclidean, on model-space values) or `"cosine"` (`1 - cos`, for features).
        batch_size (`int`): samples per pass over the reference.
        chunk_size (`int`): reference items per GEMM.
        device: where to compute (default: the samples' device); the reference is moved there once.
        show_progress (`bool`): a tqdm bar over the batches of samples.

    Returns:
        [`Neighbors`]: `distances` float32 `[B, k]` and `indices` int64 `[B, k]`, on the CPU.
    """
    if metric not in METRICS:
        raise ValueError(f"`metric` must be one of {METRICS}, got {metric!r}.")
    if k < 1 or batch_size < 1 or chunk_size < 1:
        raise ValueError(f"`k`, `batch_size` and `chunk_size` must be positive, got {k}, {batch_size}, {chunk_size}.")
    samples, reference = _rows(samples, "samples"), _rows(reference, "reference")
    _check_pair(samples, reference, min_reference=k)
    device = torch.device(device) if device is not None else samples.device
    if metric == "cosine":
        samples, reference = _unit_rows(samples), _unit_rows(reference)
    reference = reference.to(device)
    mean, sq_norms = StoredImageStats().get(reference, chunk_size)  # mu [D], ||y_i - mu||^2 [M], float32

    distances, indices = [], []
    starts = range(0, len(samples), batch_size)
    for start in tqdm(starts, desc="Nearest neighbours", unit="batch", disable=not show_progress):
        batch = samples[start : start + batch_size].to(device)
        x = to_model_space(batch, torch.float32)  # [B, D]
        query = x - mean  # x - mu
        best_scores = torch.full((len(x), k), float("inf"), device=device)
        best_indices = torch.zeros((len(x), k), dtype=torch.int64, device=device)
        for offset, y in image_chunks(reference, chunk_size):  # y float32 [n, D]
            scores = torch.addmm(sq_norms[None, offset : offset + len(y)], query, y.T, alpha=-2.0)  # [B, n]
            ids = torch.arange(offset, offset + len(y), device=device).expand(len(x), -1)
            scores, position = torch.cat([best_scores, scores], dim=1).topk(k, dim=1, largest=False)
            best_indices = torch.cat([best_indices, ids], dim=1).gather(1, position)
            best_scores = scores
        exact = _exact_distances(batch, reference, best_indices)  # float64 [B, k]
        exact, order = exact.sort(dim=1, stable=True)
        distances.append(exact.cpu())
        indices.append(best_indices.gather(1, order).cpu())
    distances = torch.cat(distances)
    if metric == "cosine":
        distances = distances.square() / 2  # ||u - v||^2 / 2 = 1 - cos for unit vectors
    return Neighbors(distances.float(), torch.cat(indices))


def _exact_distances(batch: torch.Tensor, reference: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """float64 `||x_b - y_{indices[b, j]}||` `[B, k]` for stored rows `batch` `[B, D]` (on the CPU for MPS tensors,
    which have no float64)."""
    device = torch.device("cpu") if batch.device.type == "mps" else batch.device
    x = to_model_space(batch.to(device), torch.float64)
    neighbours = reference[indices.reshape(-1)].to(device)
    neighbours = to_model_space(neighbours, torch.float64).reshape(*indices.shape, -1)
    return (x[:, None, :] - neighbours).norm(dim=2)


def nearest_other_distances(
    reference,
    max_queries: int | None = 5000,
    metric: str = "l2",
    **search_kwargs,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    The distance of reference items to their nearest *other* reference item: the scale against which a sample's
    nearest-training-image distance reads as close or far. With `max_queries`, that many items evenly spaced
    through the reference are the queries (each still searched against all M); `None` queries all of them.

    Returns:
        `(query indices int64 [Q], distances float32 [Q])`. A duplicate image has distance 0.
    """
    rows = _rows(reference, "reference")
    if len(rows) < 2:
        raise ValueError(f"`reference` has {len(rows)} images; a nearest other image needs at least 2.")
    count = len(rows) if max_queries is None else min(int(max_queries), len(rows))
    if count < 1:
        raise ValueError(f"`max_queries` must be positive or None, got {max_queries}.")
    queries = torch.linspace(0, len(rows) - 1, count, dtype=torch.float64).round().long().unique()
    found = nearest_neighbors(rows[queries], rows, k=2, metric=metric, **search_kwargs)
    # The first of the two that is not the query itself (with duplicates, the query may come second or not at all).
    first_is_self = found.indices[:, 0] == queries
    return queries, torch.where(first_is_self, found.distances[:, 1], found.distances[:, 0])


# ---------------------------------------------------------------------------------------------- memorization
@dataclass
class Memorization:
    """
    The ratio test per sample (module docstring).

    Args:
        fraction (`float`): the fraction of samples with `d_1 <= ratio * d_2`.
        memorized (`torch.Tensor`): bool `[B]`, which samples pass.
        neighbors ([`Neighbors`]): the two nearest reference items of each sample (`[B, 2]`).
        ratio (`float`): the ratio used.
    """

    fraction: float
    memorized: torch.Tensor
    neighbors: Neighbors
    ratio: float


def memorization(
    samples,
    reference,
    ratio: float = DEFAULT_MEMORIZATION_RATIO,
    metric: str = "l2",
    **search_kwargs,
) -> Memorization:
    r"""
    Which samples copy a training image: nearest reference item closer than `ratio` times the second nearest
    (`d_1 <= ratio * d_2`; an exact copy of an image present twice, `d_1 = d_2 = 0`, counts as memorized).

    Args:
        samples, reference: as in [`nearest_neighbors`] (the reference needs at least 2 items).
        ratio (`float`): in (0, 1]; 1/3 by default.
        metric (`str`): `"l2"` for images, `"cosine"` for features.
        search_kwargs: `batch_size`, `chunk_size`, `device`, `show_progress` of [`nearest_neighbors`].

    Returns:
        [`Memorization`].
    """
    if not 0.0 < ratio <= 1.0:
        raise ValueError(f"`ratio` must be in (0, 1], got {ratio}; 1/3 is the usual threshold.")
    found = nearest_neighbors(samples, reference, k=2, metric=metric, **search_kwargs)
    d = found.distances.double()
    memorized = d[:, 0] <= ratio * d[:, 1]
    return Memorization(float(memorized.double().mean()), memorized, found, ratio)


# ---------------------------------------------------------------------------------------------- Fréchet distance
def _sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """The symmetric square root of a symmetric PSD matrix (float64), negative rounding eigenvalues clamped at 0."""
    eigvals, eigvecs = torch.linalg.eigh(0.5 * (matrix + matrix.T))
    return (eigvecs * eigvals.clamp(min=0.0).sqrt()) @ eigvecs.T


def _trace_sqrt_psd(matrix: torch.Tensor) -> torch.Tensor:
    """`tr(M^{1/2})` of a symmetric PSD matrix: the sum of the square roots of its (clamped) eigenvalues."""
    return torch.linalg.eigvalsh(0.5 * (matrix + matrix.T)).clamp(min=0.0).sqrt().sum()


def gaussian_statistics(features, chunk_size: int = 4096, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """
    Mean and unbiased covariance of `features` `[N, ...]` (uint8 images are mapped to model space), float64,
    streamed in chunks about a shift ([`~kernels.moments.StreamingMoments`]).

    Returns:
        `(mean [D], covariance [D, D])`, float64.
    """
    rows = _rows(features, "features")
    if len(rows) < 2:
        raise ValueError(f"A covariance needs at least 2 items, got {len(rows)}.")
    moments = StreamingMoments(rows.shape[1], device=device if device is not None else rows.device)
    for start in range(0, len(rows), chunk_size):
        moments.update(to_model_space(rows[start : start + chunk_size], torch.float64))
    return moments.mean, moments.covariance()


def frechet_distance_from_statistics(
    mean_a: torch.Tensor, cov_a: torch.Tensor, mean_b: torch.Tensor, cov_b: torch.Tensor
) -> float:
    r"""
    The Fréchet distance between N(mean_a, cov_a) and N(mean_b, cov_b) (module docstring), in float64:
    `tr((S_a^{1/2} S_b S_a^{1/2})^{1/2})` from the eigendecomposition of the symmetric PSD matrix
    `S_a^{1/2} S_b S_a^{1/2}` (no non-symmetric `sqrtm`, no complex parts). Clamped at 0 (rounding).

    Args:
        mean_a, mean_b (`torch.Tensor`): `[D]`.
        cov_a, cov_b (`torch.Tensor`): `[D, D]`, symmetric PSD.
    """
    mean_a, mean_b, cov_a, cov_b = (t.to(mean_a.device, torch.float64) for t in (mean_a, mean_b, cov_a, cov_b))
    dim = mean_a.shape[0]
    if mean_b.shape != (dim,) or cov_a.shape != (dim, dim) or cov_b.shape != (dim, dim):
        raise ValueError(
            f"The statistics must be means [D] and covariances [D, D] of one D, got {list(mean_a.shape)}, "
            f"{list(cov_a.shape)}, {list(mean_b.shape)}, {list(cov_b.shape)}."
        )
    root_a = _sqrt_psd(cov_a)
    cross = _trace_sqrt_psd(root_a @ cov_b @ root_a)
    distance = (mean_a - mean_b).square().sum() + cov_a.trace() + cov_b.trace() - 2.0 * cross
    return max(float(distance), 0.0)


def _centred_chunks(rows: torch.Tensor, mean: torch.Tensor, chunk_size: int):
    for start in range(0, len(rows), chunk_size):
        yield to_model_space(rows[start : start + chunk_size].to(mean.device), torch.float64) - mean


def _frechet_distance_low_rank(small: torch.Tensor, large: torch.Tensor, chunk_size: int, device) -> float:
    r"""
    The Fréchet distance when the smaller set has fewer items n than dimensions D: with X the centred small set
    `[n, D]`, S_a = X^T X / (n - 1), the non-zero eigenvalues of S_a^{1/2} S_b S_a^{1/2} are those of the `[n, n]`
    matrix X S_b X^T / (n - 1), accumulated over chunks of the large set without any `[D, D]` matrix.
    """
    mean_a, _ = _mean_and_sq_sum(small, chunk_size, device)
    mean_b, sq_b = _mean_and_sq_sum(large, chunk_size, device)
    x = torch.cat(list(_centred_chunks(small, mean_a, chunk_size)))  # X  [n, D]
    gram = torch.zeros(len(x), len(x), dtype=torch.float64, device=device)
    for centred in _centred_chunks(large, mean_b, chunk_size):
        projected = x @ centred.T  # [n, m]
        gram.addmm_(projected, projected.T)  # X (sum (y - mu_b)(y - mu_b)^T) X^T
    cross = _trace_sqrt_psd(gram / ((len(x) - 1) * (len(large) - 1)))
    trace_a = x.square().sum() / (len(x) - 1)
    trace_b = sq_b / (len(large) - 1)
    distance = (mean_a - mean_b).square().sum() + trace_a + trace_b - 2.0 * cross
    return max(float(distance), 0.0)


def _mean_and_sq_sum(rows: torch.Tensor, chunk_size: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 mean `[D]` and the sum of squared centred norms (two passes)."""
    total = torch.zeros(rows.shape[1], dtype=torch.float64, device=device)
    for start in range(0, len(rows), chunk_size):
        total += to_model_space(rows[start : start + chunk_size].to(device), torch.float64).sum(dim=0)
    mean = total / len(rows)
    sq_sum = sum((c.square().sum() for c in _centred_chunks(rows, mean, chunk_size)), torch.zeros((), device=device))
    return mean, sq_sum


def frechet_distance(
    features_a, features_b, chunk_size: int = 4096, device: torch.device | str | None = None
) -> float:
    r"""
    The Fréchet distance between Gaussians fitted to two sets (module docstring), float64.

    Symmetric in its arguments. When both sets have at least D items it forms the two `[D, D]` covariances
    ([`gaussian_statistics`], [`frechet_distance_from_statistics`]); when one has fewer (e.g. 64 samples of 64x64x3
    images), the same value comes from an `[n, n]` matrix (`n` the smaller count), without any `[D, D]` matrix.

    Args:
        features_a, features_b: `[N_a, ...]` and `[N_b, ...]` (tensors, arrays or `ImageSet`s; uint8 images are mapped
            to model space `[-1, 1]`), at least 2 items each, the same number of values per item.
        chunk_size (`int`): items converted to float64 at a time.
        device: where to compute (default: `features_a`'s device; float64 must be supported there).

    Returns:
        `float`: the distance (0 for two sets with equal means and covariances).
    """
    a, b = _rows(features_a, "features_a"), _rows(features_b, "features_b")
    if len(a) < 2 or len(b) < 2:
        raise ValueError(f"A Fréchet distance needs at least 2 items per set, got {len(a)} and {len(b)}.")
    if a.shape[1] != b.shape[1]:
        raise ValueError(
            f"The two sets have {a.shape[1]} and {b.shape[1]} values per item; compare images of one size or "
            "features of one encoder."
        )
    device = torch.device(device) if device is not None else a.device
    if min(len(a), len(b)) < a.shape[1]:
        small, large = (a, b) if len(a) <= len(b) else (b, a)
        return _frechet_distance_low_rank(small, large, chunk_size, device)
    mean_a, cov_a = gaussian_statistics(a, chunk_size, device)
    mean_b, cov_b = gaussian_statistics(b, chunk_size, device)
    return frechet_distance_from_statistics(mean_a, cov_a, mean_b, cov_b)


# ---------------------------------------------------------------------------------------------- everything at once
def _summary(values: torch.Tensor) -> dict:
    values = values.double()
    return {
        "mean": float(values.mean()),
        "median": float(values.median()),
        "min": float(values.min()),
        "max": float(values.max()),
    }


@dataclass
class SampleEvaluation:
    """
    The scores of a set of samples against a reference set ([`evaluate_samples`]); `to_dict()` gives `metrics.json`.

    Args:
        num_samples, num_reference (`int`): the set sizes.
        memorization ([`Memorization`]): the ratio test in pixel space (L2, model space).
        reference_distances (`torch.Tensor`): float32 `[Q]`, reference images to their nearest other one.
        fd_pixels (`float`): Fréchet distance in pixel space (model space `[-1, 1]`); None for a single sample.
        fd_features (`float`, *optional*), memorization_features ([`Memorization`], *optional*): the same in the
            encoder's features (cosine distance for the ratio test), with `feature_model` its name.
    """

    num_samples: int
    num_reference: int
    memorization: Memorization
    reference_distances: torch.Tensor
    fd_pixels: float | None
    fd_features: float | None = None
    memorization_features: Memorization | None = None
    feature_model: str | None = None

    def to_dict(self) -> dict:
        nearest = self.memorization.neighbors.distances[:, 0]
        metrics = {
            "num_samples": self.num_samples,
            "num_reference": self.num_reference,
            "memorized_fraction": self.memorization.fraction,
            "memorization_ratio": self.memorization.ratio,
            "nearest_distance": {
                "samples": _summary(nearest),
                "reference": {**_summary(self.reference_distances), "num_queries": len(self.reference_distances)},
            },
            "fd_pixels": self.fd_pixels,
        }
        if self.memorization_features is not None:
            metrics["feature_model"] = self.feature_model
            metrics["fd_features"] = self.fd_features
            metrics["memorized_fraction_features"] = self.memorization_features.fraction
        return metrics


def evaluate_samples(
    samples,
    reference,
    ratio: float = DEFAULT_MEMORIZATION_RATIO,
    encoder=None,
    max_reference_queries: int | None = 5000,
    batch_size: int = 1024,
    chunk_size: int = 4096,
    device: torch.device | str | None = None,
    show_progress: bool = False,
) -> SampleEvaluation:
    """
    Scores samples against the training set: the ratio test and nearest distances in pixel space, FD_pixels, and
    with an `encoder` FD and the ratio test (cosine) in its features.

    Args:
        samples (`torch.Tensor`): `[B, C, H, W]`, uint8 `[0, 255]` or float model space (`pipe(output_type="pt")`
            images are `[0, 1]`: map them with `2 * x - 1`).
        reference: `[M, C, H, W]` of the same `(C, H, W)` (a tensor or an `ImageSet`, e.g. `load_builtin("digits")`).
        ratio (`float`): the ratio test's threshold.
        encoder (*optional*): a callable `images [N, C, H, W] -> features [N, F]` with a `name`, e.g. a
            [`~evaluation.features.FeatureEncoder`].
        max_reference_queries (`int`, *optional*): reference images whose nearest other image sets the scale
            ([`nearest_other_distances`]).
        batch_size, chunk_size, device, show_progress: of the nearest-neighbour search.

    Returns:
        [`SampleEvaluation`].
    """
    images = samples.images if isinstance(samples, ImageSet) else samples
    train = reference.images if isinstance(reference, ImageSet) else reference
    if not isinstance(images, torch.Tensor) or not isinstance(train, torch.Tensor) or images.ndim != 4:
        raise ValueError("`samples` and `reference` must be image tensors [N, C, H, W] (or ImageSets).")
    if tuple(images.shape[1:]) != tuple(train.shape[1:]):
        raise ValueError(
            f"The samples are {list(images.shape[1:])} and the reference images {list(train.shape[1:])}; resize the "
            "samples to the reference's size first (the `evaluate` command does it)."
        )
    search = {"batch_size": batch_size, "chunk_size": chunk_size, "device": device, "show_progress": show_progress}
    memorized = memorization(images, train, ratio=ratio, **search)
    _, reference_distances = nearest_other_distances(train, max_queries=max_reference_queries, **search)
    fd_device = device if device is None or torch.device(device).type in ("cpu", "cuda") else "cpu"
    with_fd = len(images) >= 2
    if not with_fd:
        logger.warning("One sample has no covariance: the Fréchet distances are left out (None).")
    result = SampleEvaluation(
        num_samples=len(images),
        num_reference=len(train),
        memorization=memorized,
        reference_distances=reference_distances,
        fd_pixels=frechet_distance(images, train, device=fd_device) if with_fd else None,
    )
    summary = f"{memorized.fraction:.1%} of {len(images)} samples memorize a training image (ratio {ratio:.3g})"
    if with_fd:
        summary += f"; FD_pixels {result.fd_pixels:.4g}"
    if encoder is not None:
        sample_features, reference_features = encoder(images), encoder(train)
        result.memorization_features = memorization(
            sample_features, reference_features, ratio=ratio, metric="cosine", **search
        )
        result.feature_model = getattr(encoder, "name", type(encoder).__name__)
        if with_fd:
            result.fd_features = frechet_distance(sample_features, reference_features)
            summary += f", FD_features {result.fd_features:.4g}"
        summary += f", memorized (features) {result.memorization_features.fraction:.1%}"
    logger.info(summary)
    return result
