"""Statistics of image data, streamed over batches: mean and unbiased covariance in float64, and its eigenbasis."""

from __future__ import annotations

import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from ..data import DataShard, ImageBatch, ImageSet, is_hf_dataset, iter_image_batches, to_model_space
from .cost import CPU_EIGH_FLOPS, CPU_FLOPS_FLOAT64, LONG_FIT_SECONDS, eigh_flops
from .reductions import Communicator

logger = logging.get_logger(__name__)


class StreamingMoments:
    r"""
    Count, sum and sum of outer products of flattened images, accumulated in float64.

    Memory is O(D^2) whatever the number of images. The sums are taken about a shift `K` (the first batch's mean),
    which keeps the covariance accurate when the mean is large compared to the spread:

        mean = K + s1 / n,    cov = (s2 - s1 s1^T / n) / (n - 1),    s1 = sum (y - K),  s2 = sum (y - K)(y - K)^T

    The three sums add across shards once they share one shift (`recentre`, `merge`), so a distributed fit
    all-reduces `count`, `sum` and `outer` ([`all_reduce_moments`]).

    With `keep_rows=True` the shifted rows y - K are kept instead of being added to `outer` while there are fewer
    than D of them (they take less memory than the D x D sums then): [`covariance_eigenbasis`] can decompose the
    N x N Gram matrix instead of the D x D covariance. The first image past D-1 (or any `recentre` / `merge` /
    `flush_rows`) adds the kept rows to `outer` and stops keeping.
    """

    def __init__(self, dim: int, device: torch.device | str = "cpu", keep_rows: bool = False):
        self.dim = dim
        self.count = 0
        self.shift: torch.Tensor | None = None
        self.sum = torch.zeros(dim, dtype=torch.float64, device=device)
        self.outer = None if keep_rows else torch.zeros(dim, dim, dtype=torch.float64, device=device)
        self.rows: list[torch.Tensor] | None = [] if keep_rows else None  # y - K, float64 [n_j, D] each

    def update(self, batch: torch.Tensor) -> None:
        """Adds a `[B, D]` batch (any float dtype; converted to float64)."""
        batch = batch.reshape(len(batch), -1).to(self.sum.device, torch.float64)
        if batch.shape[1] != self.dim:
            raise ValueError(f"Expected images with {self.dim} values each, got {batch.shape[1]}.")
        if self.shift is None:
            self.shift = batch.mean(0)
        centred = batch - self.shift
        self.count += len(batch)
        self.sum += centred.sum(0)
        if self.rows is not None and self.count < self.dim:
            self.rows.append(centred)
            return
        self.flush_rows()
        self.outer.addmm_(centred.T, centred)

    def flush_rows(self) -> None:
        """Adds the kept rows to `outer` (allocated now) and stops keeping rows."""
        if self.rows is None:
            return
        self.outer = torch.zeros(self.dim, self.dim, dtype=torch.float64, device=self.sum.device)
        for centred in self.rows:
            self.outer.addmm_(centred.T, centred)
        self.rows = None

    def recentre(self, shift: torch.Tensor) -> None:
        r"""
        Re-expresses the sums about a new shift K' (exact algebra, float64): with d = K - K',

            s1' = s1 + n d,    s2' = s2 + d s1^T + s1 d^T + n d d^T
        """
        shift = shift.to(self.sum.device, torch.float64)
        self.flush_rows()
        if self.shift is None or self.count == 0:
            self.shift = shift.clone()
            return
        delta = self.shift - shift  # d  [D]
        self.outer += (
            torch.outer(delta, self.sum) + torch.outer(self.sum, delta) + self.count * torch.outer(delta, delta)
        )
        self.sum += self.count * delta
        self.shift = shift.clone()

    def merge(self, other: StreamingMoments) -> None:
        """Adds the moments of a disjoint set of images (re-centred to this object's shift)."""
        if other.dim != self.dim:
            raise ValueError(
                f"Cannot merge moments of {other.dim}-dimensional images into {self.dim}-dimensional ones."
            )
        if other.count == 0:
            return
        self.flush_rows()
        other.flush_rows()
        if self.count == 0:
            self.shift, self.count = other.shift.clone(), other.count
            self.sum, self.outer = other.sum.clone(), other.outer.clone()
            return
        other_sum, other_outer, other_shift = other.sum, other.outer, other.shift
        delta = other_shift - self.shift
        self.outer += other_outer + torch.outer(delta, other_sum) + torch.outer(other_sum, delta)
        self.outer += other.count * torch.outer(delta, delta)
        self.sum += other_sum + other.count * delta
        self.count += other.count

    @property
    def mean(self) -> torch.Tensor:
        return self.shift + self.sum / self.count

    def covariance(self) -> torch.Tensor:
        """The unbiased (n - 1) covariance, float64 `[D, D]`."""
        if self.count < 2:
            raise ValueError(f"The covariance needs at least 2 images, got {self.count}.")
        self.flush_rows()
        centred_sum = self.sum[:, None]
        cov = (self.outer - centred_sum @ centred_sum.T / self.count) / (self.count - 1)
        return 0.5 * (cov + cov.T)


def symmetric_eigh(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `(eigenvalues ascending, eigenvectors)` of a symmetric matrix, in its dtype and on its device.

    A float64 matrix on the CPU goes to LAPACK's divide-and-conquer driver (`dsyevd`) through SciPy, which measured
    faster than `torch.linalg.eigh` on the same matrix (benchmarks/README.md); the same backward-stable float64
    algorithm, so the two agree to float64 rounding. Anything else, or a SciPy failure, uses `torch.linalg.eigh`.
    """
    if matrix.device.type == "cpu" and matrix.dtype == torch.float64 and matrix.ndim == 2:
        from scipy import linalg  # heavy: imported when a fit needs it

        try:
            eigvals, eigvecs = linalg.eigh(matrix.numpy(), driver="evd")
        except (ValueError, linalg.LinAlgError):  # non-finite entries or no convergence: torch's message
            return torch.linalg.eigh(matrix)
        return torch.from_numpy(eigvals), torch.from_numpy(eigvecs)
    return torch.linalg.eigh(matrix)


def eigen_decomposition(cov: torch.Tensor, rank: int | None = None):
    """
    `cov = U diag(lam) U^T` in float64 ([`symmetric_eigh`]), eigenvalues clamped at 0, sorted descending.

    With `rank = r`, the top r pairs are kept and the discarded eigenvalues are summarised by their mean `floor`
    (the maximum-likelihood isotropic variance of probabilistic PCA); without, `floor = 0`.

    Returns:
        `(eigvecs [D, r], eigvals [r], floor)` in float64.
    """
    eigvals, eigvecs = symmetric_eigh(cov)
    eigvals = eigvals.flip(0).clamp(min=0.0)
    eigvecs = eigvecs.flip(1)
    dim = len(eigvals)
    if rank is None or rank >= dim:
        return eigvecs, eigvals, 0.0
    floor = float(eigvals[rank:].mean())
    return eigvecs[:, :rank].contiguous(), eigvals[:rank].contiguous(), floor


def covariance_eigenbasis(moments: StreamingMoments, rank: int | None = None):
    r"""
    The eigendecomposition of the moments' unbiased covariance, as [`eigen_decomposition`] gives it, from the
    cheaper of two exact routes:

    - the D x D covariance S = X^T X / (N - 1) (X: the centred images as rows), ~9 D^3 flops in `eigh`;
    - while fewer than D images were kept as rows (`StreamingMoments(keep_rows=True)`), the N x N Gram matrix
      G = X X^T / (N - 1): S and G share their non-zero eigenvalues, and G v = lam v gives S's eigenvector
      u = X^T v / ||X^T v||. About 4 N^2 D + 9 N^3 flops: at N = 2000, D = 12288, seconds instead of many minutes.
      S has rank < N, so its other D - N + 1 eigenvalues are exactly 0; eigenvalues below the float64 rounding of
      the decomposition (lam_max D eps) count as 0 too, their vectors being noise.

    Returns:
        `(eigvecs [D, k], eigvals [k], floor)` in float64, eigenvalues descending, with k = min(rank or D, D) from
        the covariance and k <= min(rank or N, N) from the Gram matrix: the eigenvalues of columns k..rank-1 (and
        of every column the caller pads with zeros) are 0. `floor` is the mean of the discarded eigenvalues over the
        D - rank directions outside the kept ones.
    """
    if moments.rows is None:
        if moments.sum.device.type == "cpu":
            _warn_if_long_eigh(moments.dim, moments.count)
        return eigen_decomposition(moments.covariance(), rank)
    if moments.count < 2:
        raise ValueError(f"The covariance needs at least 2 images, got {moments.count}.")
    dim, count = moments.dim, moments.count
    centred = torch.cat(moments.rows).sub_(moments.sum / count)  # X = y - mean  [N, D]
    gram = centred @ centred.T / (count - 1)  # G  [N, N]
    eigvals, vectors = symmetric_eigh(0.5 * (gram + gram.T))
    eigvals, vectors = eigvals.flip(0), vectors.flip(1)
    tolerance = float(eigvals[0].clamp(min=0)) * dim * torch.finfo(torch.float64).eps
    kept = int((eigvals > tolerance).sum())
    if rank is not None:
        kept = min(kept, rank)
    eigvecs = centred.T @ vectors[:, :kept]  # X^T v  [D, k]
    eigvecs /= torch.linalg.vector_norm(eigvecs, dim=0)
    floor = 0.0
    if rank is not None and rank < dim:
        discarded = eigvals[kept:]
        floor = float(discarded[discarded > tolerance].sum()) / (dim - rank)
    return eigvecs, eigvals[:kept].contiguous(), floor


def _warn_if_long_moments(dim: int, count: int) -> None:
    """A warning with the estimated time before streaming `count` images into D x D float64 sums (2 N D^2 flops)."""
    flops = 2.0 * count * float(dim) ** 2
    if flops / CPU_FLOPS_FLOAT64 < LONG_FIT_SECONDS:
        return
    logger.warning(
        f"Accumulating the {dim} x {dim} covariance of {count} images: about {flops / 1e12:.3g} TFLOP in float64, "
        f"{flops / CPU_FLOPS_FLOAT64 / 60:.3g} min at {CPU_FLOPS_FLOAT64 / 1e9:.0f} GFLOP/s (a few CPU cores)."
    )


def _warn_if_long_eigh(dim: int, count: int) -> None:
    """A warning with the estimated time before a D x D eigendecomposition of more than `LONG_FIT_SECONDS`."""
    flops = eigh_flops(dim)
    if flops / CPU_EIGH_FLOPS < LONG_FIT_SECONDS:
        return
    logger.warning(
        f"Decomposing the {dim} x {dim} covariance of {count} images: about {flops / 1e12:.3g} TFLOP in float64, "
        f"{flops / CPU_EIGH_FLOPS / 60:.3g} min at {CPU_EIGH_FLOPS / 1e9:.0f} GFLOP/s (an eigendecomposition on a few "
        f"CPU cores). A fit on fewer than {dim} images takes the N x N Gram route instead (seconds); "
        "`device='cuda'` runs it on a GPU."
    )


def fit_moments(
    data,
    batch_size: int = 256,
    show_progress: bool = True,
    desc: str = "Fitting moments",
    keep_rows: bool = False,
    device: torch.device | str | None = None,
    **data_kwargs,
) -> tuple[StreamingMoments, tuple[int, int, int]]:
    """
    Streams `data` (anything [`iter_image_batches`] accepts) into [`StreamingMoments`].

    A [`~diffusers_analytic.data.DataShard`] (from `shard_data`, under `accelerate launch` / `torchrun`) is
    this process's part of the data: it is streamed, then the sums of all processes are all-reduced, so every process
    returns the moments of the whole data set (equal to a single-process fit to float64 rounding).

    `keep_rows=True` keeps the images as rows while there are fewer than D of them, for
    [`covariance_eigenbasis`]'s Gram route (a distributed fit adds them up as D x D sums). `device` is where the
    float64 sums live and are computed (default: the CPU); it must support float64 (not MPS).

    Returns:
        `(moments, (C, H, W))`.
    """
    device = torch.device("cpu" if device is None else device)
    if device.type == "mps":
        raise ValueError(
            "A fit accumulates float64 moments, which MPS does not support; fit on the CPU (device='cpu')."
        )
    shard = data if isinstance(data, DataShard) else None
    if shard is not None:
        data = shard.data
        show_progress = show_progress and shard.index == 0
    moments = None
    shape = None
    sized = isinstance(data, (torch.Tensor, ImageSet)) or (is_hf_dataset(data) and hasattr(data, "__len__"))
    total = len(data) if sized else None
    progress = tqdm(total=total, desc=desc, unit="img", disable=not show_progress)
    batch: ImageBatch
    for batch in iter_image_batches(data, batch_size=batch_size, **data_kwargs):
        if shape is None:
            shape = tuple(batch.images.shape[1:])
            moments = StreamingMoments(shape[0] * shape[1] * shape[2], device=device, keep_rows=keep_rows)
            if device.type == "cpu" and total is not None and (total >= moments.dim or not keep_rows):
                _warn_if_long_moments(moments.dim, total)
        elif tuple(batch.images.shape[1:]) != shape:
            raise ValueError(f"All images must have the same shape; got {shape} and {tuple(batch.images.shape[1:])}.")
        moments.update(to_model_space(batch.images, torch.float64))
        progress.update(len(batch.images))
    progress.close()
    if shard is not None and shard.communicator is not None:
        moments = all_reduce_moments(moments, shard.communicator)
    logger.info(f"Accumulated moments of {moments.count} images of shape {shape}.")
    return moments, shape


def all_reduce_moments(moments, communicator: Communicator):
    r"""
    Combines the [`StreamingMoments`] of every process, in place; afterwards each
    process holds the moments of the whole data set.

    The sums are taken about a shift K that must be common before they can be added. The first process that saw any
    image lends its shift K_0 (with contiguous shards, its first batch is the data's first batch, so K_0 is the
    single-process shift), the others re-centre exactly (`StreamingMoments.recentre`), then count, sum and outer
    products are all-reduced (SUM) in float64.
    """
    world = communicator.world_size
    device = moments.sum.device
    moments.flush_rows()  # the D x D sums are what add across processes
    # 1. the lowest rank that has images lends its shift
    has_images = moments.count > 0
    owner = communicator.all_reduce(torch.tensor([communicator.rank if has_images else world], device=device), "min")
    owner = int(owner.item())
    if owner == world:
        raise ValueError("No process has any image to fit on.")
    mine = moments.shift if communicator.rank == owner else torch.zeros_like(moments.sum)
    shift = communicator.all_reduce(mine, "sum")  # adding zeros: exact
    if has_images:
        moments.recentre(shift)
    else:
        moments.shift = shift
    # 2. n, s1 = sum (y - K), s2 = sum (y - K)(y - K)^T add across shards
    count = communicator.all_reduce(torch.tensor([moments.count], dtype=torch.int64, device=device), "sum")
    moments.count = int(count.item())
    moments.sum = communicator.all_reduce(moments.sum, "sum")
    moments.outer = communicator.all_reduce(moments.outer, "sum")
    return moments
