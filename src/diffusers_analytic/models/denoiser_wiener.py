"""Wiener denoiser: the exact posterior mean under a Gaussian fitted to the data (docs/math.md)."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import logging

from ..data import DATA_SOURCE_KEYWORDS
from ..kernels.moments import eigen_decomposition, fit_moments
from .modeling_analytic import AnalyticDenoiserMixin

logger = logging.get_logger(__name__)


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

    @classmethod
    def from_dataset(cls, images, batch_size: int = 256, show_progress: bool = True, **config) -> WienerDenoiser:
        r"""
        Fits mean and unbiased (N - 1) covariance in float64, streamed over batches (memory O(D^2) whatever N),
        then its eigendecomposition with `torch.linalg.eigh`; eigenvalues clamped at 0, stored as float32.

        Args:
            images: anything [`~diffusers_analytic.data.iter_image_batches`] reads: a float tensor `[N, C, H, W]` in
                `[-1, 1]`, a uint8 tensor in `[0, 255]`, an `ImageSet`, a `datasets.Dataset`, an iterable of batches.
            batch_size (`int`, defaults to 256): images per streamed batch.
            show_progress (`bool`, defaults to `True`): a tqdm bar while fitting.
            **config: `rank`, the schedule, `prediction_type`; data-source options `image_column`, `resolution`,
                `channels`, `value_range`; `sample_size` / `in_channels` are read from the data.
        """
        data_kwargs = {k: config.pop(k) for k in DATA_SOURCE_KEYWORDS if k in config}
        moments, shape = fit_moments(images, batch_size=batch_size, show_progress=show_progress, **data_kwargs)
        denoiser = cls(**cls._config_for_data(shape, config))
        eigvecs, eigvals, floor = eigen_decomposition(moments.covariance(), denoiser.config.rank)
        denoiser.mean.copy_(moments.mean)
        denoiser.eigvecs.copy_(eigvecs)
        denoiser.eigvals.copy_(eigvals)
        denoiser.eigval_floor.fill_(floor)
        logger.info(f"Fitted a Wiener denoiser on {moments.count} images (D = {len(eigvals)} eigenpairs kept).")
        return denoiser

    def _denoise(self, x_t, alpha_prod_t, beta_prod_t, generator=None, class_labels=None):
        # Notation: alpha_prod_t -> a, beta_prod_t -> 1 - a, eigvals -> lam, eigvecs -> U, mean -> mu.
        batch_size = x_t.shape[0]
        a, one_minus_a = alpha_prod_t[:, None], beta_prod_t[:, None]  # [B, 1] float64
        mean = self.mean.float()
        eigvecs = self.eigvecs.float()

        # 1. Shrinkage of each eigendirection, sqrt(a) lam / (a lam + 1 - a); 0 where the Gaussian is a point mass.
        def shrink(lam):
            denominator = a * lam + one_minus_a
            return torch.where(denominator > 0, a.sqrt() * lam / denominator.clamp(min=1e-300), 0.0)

        lam = self.eigvals.to(a.dtype)[None, :]  # [1, r]
        floor = self.eigval_floor.to(a.dtype)
        gain = shrink(lam)  # [B, r]
        gain_floor = shrink(floor)  # [B, 1] (0 without a rank cut)

        # 2. x0_hat = mu + g_floor v + U diag(g - g_floor) U^T v,   v = x_t - sqrt(a) mu
        v = x_t.reshape(batch_size, -1) - a.sqrt().to(x_t.dtype) * mean  # [B, D]
        coeffs = (v @ eigvecs) * (gain - gain_floor).to(x_t.dtype)  # [B, r]
        x0_hat = mean + gain_floor.to(x_t.dtype) * v + coeffs @ eigvecs.T  # [B, D]
        return x0_hat.reshape(x_t.shape)
