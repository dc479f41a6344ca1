"""Wiener denoiser: the exact posterior mean under a Gaussian fitted to the data (docs/math.md)."""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import logging

from ..data import DATA_SOURCE_KEYWORDS
from ..kernels.moments import covariance_eigenbasis, fit_moments
from ..kernels.stored_images import CacheLock, buffer_key
from .modeling_analytic import AnalyticDenoiserMixin

logger = logging.get_logger(__name__)

_COPY_LIMIT = 1 << 20  # eigenvector entries up to which the cache keeps its own transposed copy (4 MiB)


class WienerDenoiser(AnalyticDenoiserMixin, ModelMixin, ConfigMixin):
    r"""
    The posterior mean of x_0 given x_t when the data are Gaussian N(mu, S), S = U diag(lam) U^T:

        x0_hat = mu + U diag( sqrt(a) lam / (a lam + 1 - a) ) U^T (x_t - sqrt(a) mu)

    This is the exact score of N(mu, S): sampling with it reproduces N(mu, S) with any scheduler. Applied in the
    eigenbasis, a call costs about 4 B D r flops; no D x D matrix is built per call.

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): image height and width.
        in_channels (`int`, defaults to 3): channels per image.
        rank (`int`, *optional*):
            Keep only the top `rank` eigenpairs. The other D - rank directions are not dropped: they share one
            variance, the mean of the discarded eigenvalues (probabilistic PCA's isotropic floor), so the covariance
            used is `U_r diag(lam_r) U_r^T + floor (I - U_r U_r^T)`, which keeps the total variance. `None` keeps all
            D (exact).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            The training noise schedule, as in diffusers' `DDIMScheduler`; the defaults equal `DDIMScheduler()`'s.
        prediction_type (`str`, defaults to `"epsilon"`): what `forward` returns: `"epsilon"`, `"v_prediction"` or
            `"sample"` (x0).
    """

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        rank: int | None = None,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        self._init_analytic()
        dim = self.sample_shape[0] * self.sample_shape[1] * self.sample_shape[2]
        if rank is not None and not 1 <= rank <= dim:
            raise ValueError(f"`rank` must be in [1, {dim}] (the image dimension), got {rank}.")
        kept = dim if rank is None else rank
        self.register_buffer("mean", torch.zeros(dim))  # mu      [D]
        self.register_buffer("eigvecs", torch.zeros(dim, kept))  # U  [D, r]
        self.register_buffer("eigvals", torch.zeros(kept))  # lam     [r]
        self.register_buffer("eigval_floor", torch.zeros(()))  # variance of the D - r discarded directions
        self._operator_lock = CacheLock()

    @classmethod
    def from_dataset(
        cls, images, batch_size: int = 256, show_progress: bool = True, device=None, **config
    ) -> WienerDenoiser:
        r"""
        Fits mean and unbiased (N - 1) covariance in float64, streamed over batches (memory O(D^2) whatever N),
        then its eigendecomposition in float64; eigenvalues clamped at 0, stored as float32. With fewer images than
        dimensions (N < D) the decomposition comes from the N x N Gram matrix instead (exact, and far cheaper): the
        covariance has rank < N, and the columns of `eigvecs` past its rank are zero with eigenvalue 0.

        Args:
            images: anything [`~diffusers_analytic.data.iter_image_batches`] reads: a float tensor `[N, C, H, W]` in
                `[-1, 1]`, a uint8 tensor in `[0, 255]`, an `ImageSet`, a `datasets.Dataset`, an iterable of batches.
            batch_size (`int`, defaults to 256): images per streamed batch.
            show_progress (`bool`, defaults to `True`): a tqdm bar while fitting.
            device (`str` or `torch.device`, *optional*): where the float64 moments and the eigendecomposition are
                computed (default: the CPU). A GPU decomposes a 12288 x 12288 covariance in seconds where a few CPU
                cores take many minutes. The fitted denoiser is returned on the CPU; move it with `.to()`.
            **config: `rank`, the schedule, `prediction_type`; data-source options `image_column`, `resolution`,
                `channels`, `value_range`; `sample_size` / `in_channels` are read from the data.
        """
        data_kwargs = {k: config.pop(k) for k in DATA_SOURCE_KEYWORDS if k in config}
        moments, shape = fit_moments(
            images, batch_size=batch_size, show_progress=show_progress, keep_rows=True, device=device, **data_kwargs
        )
        denoiser = cls(**cls._config_for_data(shape, config))
        eigvecs, eigvals, floor = covariance_eigenbasis(moments, denoiser.config.rank)
        kept = len(eigvals)  # fewer than the buffer's columns when the data have lower rank: those stay 0
        denoiser.mean.copy_(moments.mean)
        denoiser.eigvecs[:, :kept].copy_(eigvecs)
        denoiser.eigvals[:kept].copy_(eigvals)
        denoiser.eigval_floor.fill_(floor)
        logger.info(f"Fitted a Wiener denoiser on {moments.count} images ({kept} non-zero eigenpairs kept).")
        return denoiser

    def _operator_buffers(self) -> tuple:
        held = self._buffers
        return (held["mean"], held["eigvecs"], held["eigvals"], held["eigval_floor"])

    def _operator(self) -> _WienerOperator:
        """The buffers as the call uses them, rebuilt when one changes (`.to()`, loading, an in-place write)."""
        buffers = self._operator_buffers()
        operator = self.__dict__.get("_operator_cache")
        if operator is not None and operator.matches(buffers):
            return operator
        with self._operator_lock:
            operator = self.__dict__.get("_operator_cache")
            if operator is None or not operator.matches(buffers):
                operator = _WienerOperator(buffers)
                self.__dict__["_operator_cache"] = operator  # replaced whole, never half built
            return operator

    def estimated_flops(self, batch_size: int) -> float:
        """Two GEMMs with the basis, `[B, D] x [D, r]` and back: 4 B D r (r: the eigenpairs a call uses)."""
        # The operator of the last call when there is one (no version check on this per-call path: an estimate),
        # else built now; either way the count follows the operator's own rule for which directions it keeps.
        operator = self.__dict__.get("_operator_cache") or self._operator()
        return 4.0 * batch_size * math.prod(self.sample_shape) * operator.eigvecs_t.shape[0]

    def _apply(self, fn, *args, **kwargs):
        # `.to()`, `.cuda()`, `.half()` replace the buffers: drop the cached operator now, so that it does not keep
        # the old buffers (for D = 12288, 600 MB of eigenvectors) alive until the next call.
        self.__dict__.pop("_operator_cache", None)
        return super()._apply(fn, *args, **kwargs)

    def _denoise(self, x_t, alpha_prod_t, beta_prod_t, generator=None, class_labels=None):
        # Notation: alpha_prod_t -> a, beta_prod_t -> 1 - a, eigvals -> lam, eigvecs -> U, mean -> mu.
        op = self._operator()
        a, one_minus_a = alpha_prod_t[:, None], beta_prod_t[:, None]  # [B, 1] float64
        sqrt_a = a.sqrt()
        lam = op.eigvals if op.eigvals.dtype == a.dtype else op.eigvals.to(a.dtype)  # [1, r]

        # 1. Shrinkage of each eigendirection, sqrt(a) lam / (a lam + 1 - a); 0 where the Gaussian is a point mass.
        gain = _shrink(lam, a, sqrt_a, one_minus_a, op.nonnegative)  # [B, r]
        # 2. x0_hat = mu + g_floor v + U diag(g - g_floor) U^T v,   v = x_t - sqrt(a) mu
        v = torch.addcmul(x_t.reshape(len(x_t), -1), sqrt_a.to(x_t.dtype), op.mean, value=-1.0)  # [B, D]
        if op.floor == 0.0:  # no rank cut: g_floor = 0
            x0_hat = _apply_basis(op.eigvecs_t, v, gain.to(x_t.dtype), op.mean)
        else:
            floor = torch.full((1, 1), op.floor, dtype=a.dtype, device=a.device)
            gain_floor = _shrink(floor, a, sqrt_a, one_minus_a, op.floor >= 0.0)  # [B, 1]
            start = torch.addcmul(op.mean, gain_floor.to(x_t.dtype), v)  # mu + g_floor v
            x0_hat = _apply_basis(op.eigvecs_t, v, (gain - gain_floor).to(x_t.dtype), start)
        return x0_hat.reshape(x_t.shape)


def _apply_basis(eigvecs_t: torch.Tensor, v: torch.Tensor, gain: torch.Tensor, start: torch.Tensor) -> torch.Tensor:
    """`start + ((v U) * gain) U^T`, with `eigvecs_t` = U^T `[r, D]`."""
    blocks = _num_basis_blocks(eigvecs_t, len(v))
    if blocks == 1:
        coeffs = (v @ eigvecs_t.T).mul_(gain)  # [B, r]
        return torch.addmm(start, coeffs, eigvecs_t)  # [B, D]
    # G blocks of k eigenvectors side by side, U^T = [U_1^T; ..; U_G^T], in two batched GEMMs (see BASIS_BLOCK_BATCH):
    # x0 = start + sum_g ((v U_g) * gain_g) U_g^T.
    rank, dim = eigvecs_t.shape
    count = rank // blocks
    split = blocks * count
    basis = eigvecs_t[:split].reshape(blocks, count, dim)  # U_g^T  [G, k, D]
    coeffs = torch.matmul(v, basis.transpose(1, 2))  # [G, B, k]
    coeffs.mul_(gain[:, :split].reshape(len(v), blocks, count).transpose(0, 1))
    out = torch.bmm(coeffs, basis).sum(dim=0).add_(start)  # [B, D]
    if split < rank:  # the < G eigenvectors left over
        out.addmm_((v @ eigvecs_t[split:].T).mul_(gain[:, split:]), eigvecs_t[split:])
    return out


# A CPU batch of at most this many rows applies the basis in G blocks, one per torch thread, as one batched GEMM: a
# skinny GEMM [B, D] x [D, r] reads the basis with one core's bandwidth, G independent ones with all of them.
BASIS_BLOCK_BATCH = 32
MIN_BLOCK_ENTRIES = 1 << 20  # ... when each block holds at least this many basis entries (4 MiB)


def _num_basis_blocks(eigvecs_t: torch.Tensor, batch_size: int) -> int:
    if eigvecs_t.device.type != "cpu" or batch_size > BASIS_BLOCK_BATCH:
        return 1
    return max(1, min(torch.get_num_threads(), eigvecs_t.numel() // MIN_BLOCK_ENTRIES))


def _shrink(lam, a, sqrt_a, one_minus_a, nonnegative: bool) -> torch.Tensor:
    """
    sqrt(a) lam / (a lam + 1 - a), and 0 where the denominator is not positive. With lam >= 0 and a, 1 - a >= 0 the
    denominator is 0 only where the numerator is 0 too, so the clamp alone gives that 0 (no mask needed).
    """
    denominator = torch.addcmul(one_minus_a, a, lam)
    if nonnegative:
        return (sqrt_a * lam).div_(denominator.clamp_(min=1e-300))
    return torch.where(denominator > 0, sqrt_a * lam / denominator.clamp(min=1e-300), 0.0)


class _WienerOperator:
    """
    Float32 mean and transposed eigenvectors, eigenvalues as a float64 `[1, r]` row, the floor as a number and
    whether all eigenvalues are >= 0, derived from one version of the four buffers. It holds those buffers, so their
    storage is never freed and reused while it is cached, and matches only while each is the same tensor at the same
    version (after loading or an in-place write the next call rebuilds it; `.to()` drops it at once, see
    `WienerDenoiser._apply`).
    """

    def __init__(self, buffers):
        mean, eigvecs, eigvals, floor = buffers
        self.sources = buffers
        self.keys = tuple(_version_key(b) for b in buffers)
        self.mean = mean.float().contiguous()
        self.floor = float(floor)
        self.nonnegative = bool((eigvals >= 0).all())  # False for NaN too
        eigvecs_t = eigvecs.float().T  # U^T [r, D]
        if self.floor == 0.0 and self.nonnegative:
            # A zero eigenvalue has gain exactly 0: its direction is left out of both GEMMs (a fit on N < D images
            # has at most N - 1 non-zero eigenvalues, sorted first; the rest are zero columns).
            nonzero = eigvals != 0
            count = int(nonzero.sum())
            if count < len(eigvals):
                keep = slice(0, count) if bool(nonzero[:count].all()) else nonzero
                eigvecs_t, eigvals = eigvecs_t[keep], eigvals[keep]
        # Contiguous is the faster layout for both small GEMMs; a large U is used as stored (no copy).
        self.eigvecs_t = eigvecs_t.contiguous() if eigvecs_t.numel() <= _COPY_LIMIT else eigvecs_t
        schedule_dtype = torch.float32 if eigvals.device.type == "mps" else torch.float64
        self.eigvals = eigvals.to(schedule_dtype)[None, :].contiguous()

    def matches(self, buffers) -> bool:
        for source, key, buffer in zip(self.sources, self.keys, buffers):
            if source is not buffer or key != _version_key(buffer):
                return False
        return True


def _version_key(buffer: torch.Tensor) -> tuple:
    """Storage address and write count of a tensor; with its identity, what `buffer_key` compares (the same tensor
    object keeps its dtype, shape and device unless its storage is swapped, which moves the address)."""
    try:
        version = buffer._version
    except RuntimeError:  # an inference-mode tensor has no version counter (see `buffer_key`)
        return buffer_key(buffer)
    return (buffer.data_ptr(), version)
