"""Smoothed closed-form diffusion model (SCFDM, Scarvelis, Borde & Solomon 2023, arXiv 2310.12395): the optimal
denoiser averaged over Gaussian perturbations of x_t (docs/math.md)."""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from ..kernels.empirical import posterior_mean, posterior_mean_over_neighbors
from ..kernels.knn import NeighborIndex, check_neighbor_config
from .modeling_analytic import check_finite_positive, check_positive_int
from .stored_images import StoredImagesMixin


class SmoothedCFDMDenoiser(StoredImagesMixin, ModelMixin, ConfigMixin):
    r"""
    Smoothed closed-form denoiser ([arXiv 2310.12395](https://arxiv.org/abs/2310.12395)): the optimal (empirical
    Bayes) posterior mean averaged over `num_noise` Gaussian-perturbed copies of x_t,

        x0_hat = (1 / M) sum_j E_emp[x_0 | x_t + sigma_s z_j],   z_j ~ N(0, I),  M = num_noise,  sigma_s = smoothing_std

    with E_emp the softmax-weighted mean of the training images of [`OptimalDenoiser`] (same exact streamed
    computation, shared through `kernels.empirical.posterior_mean`). Smoothing lets samples leave the training set
    (generalize) instead of memorizing. The z_j come from the call's generator: the same generator gives the same
    output (a list of generators gives each sample its own stream, independent of the batch it is in). At
    `smoothing_std=0` the output equals the optimal denoiser's exactly and no noise is drawn.

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): image height and width.
        in_channels (`int`, defaults to 3): channels per image.
        num_images (`int`, defaults to 1): N, the number of stored images (set by `from_dataset`).
        storage_dtype (`str`, defaults to `"float32"`): `"uint8"`, `"float16"` or `"float32"` image buffer.
        has_labels (`bool`, defaults to `False`): whether an int64 `labels` buffer `[N]` is stored.
        num_noise (`int`, defaults to 8): M, perturbed copies per call (cost: M optimal evaluations, batched).
        smoothing_std (`float`, defaults to 0.1): sigma_s >= 0, the standard deviation of the perturbation in
            model space.
        temperature (`float`, defaults to 1.0): tau > 0 of the inner optimal denoiser.
        num_neighbors (`int`, *optional*): top-k mode of the inner optimal denoiser (FAISS); `None` is exact.
        chunk_size (`int`, defaults to 4096): images per streamed chunk: the logits of a chunk, `[B, chunk_size]`
            float32, are the extra memory beside one ~2 MB piece of images (float32) and O(B D).
        faiss_index, ivf_threshold, ivf_nprobe: the top-k index, as in [`OptimalDenoiser`].
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            The training noise schedule, as in diffusers' `DDIMScheduler`; the defaults equal `DDIMScheduler()`'s.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"`, `"v_prediction"` or `"sample"`.
    """

    supports_data_parallel = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        num_images: int = 1,
        storage_dtype: str = "float32",
        has_labels: bool = False,
        num_noise: int = 8,
        smoothing_std: float = 0.1,
        temperature: float = 1.0,
        num_neighbors: int | None = None,
        chunk_size: int = 4096,
        faiss_index: str = "auto",
        ivf_threshold: int = 100_000,
        ivf_nprobe: int = 32,
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
        check_finite_positive("temperature", temperature)
        if not (isinstance(smoothing_std, (int, float)) and math.isfinite(smoothing_std) and smoothing_std >= 0):
            raise ValueError(f"`smoothing_std` must be a finite number >= 0, got {smoothing_std}.")
        check_positive_int("num_noise", num_noise)
        check_positive_int("chunk_size", chunk_size)
        check_neighbor_config(num_neighbors, num_images, faiss_index)
        self._register_image_storage(num_images, storage_dtype, has_labels)  # images [N, C, H, W], labels [N]
        self._neighbors = NeighborIndex()

    @classmethod
    def from_dataset(
        cls, images, batch_size: int = 256, storage_dtype: str = "auto", show_progress: bool = True, **config
    ) -> SmoothedCFDMDenoiser:
        r"""
        Stores the training images (and their labels, when the source has them); arguments as in
        [`OptimalDenoiser.from_dataset`], with `num_noise` and `smoothing_std` among the config keywords.
        """
        return cls._from_stored_images(images, batch_size, storage_dtype, config, "a smoothed CFDM denoiser")

    def estimated_flops(self, batch_size: int) -> float:
        """The optimal denoiser's count on the M = num_noise perturbed copies: 4 M B N D exact (top-k as there)."""
        dim, count = math.prod(self.sample_shape), len(self.images)
        rows = batch_size * (self.config.num_noise if self.config.smoothing_std > 0 else 1)
        if self.config.num_neighbors is None:
            return 4.0 * rows * count * dim
        return 2.0 * rows * count * dim + 4.0 * rows * self.config.num_neighbors * dim

    def _optimal(self, x_flat, alpha_prod_t, beta_prod_t, stats, class_labels):
        """E_emp[x_0 | x] for rows x of `x_flat` `[B', D]`: exact streamed softmax, or top-k over FAISS neighbours."""
        config = self.config
        if config.num_neighbors is None:
            return posterior_mean(
                x_flat,
                alpha_prod_t,
                beta_prod_t,
                self.images_for_call(),
                stats,
                config.chunk_size,
                config.temperature,
                labels=self.labels,
                class_labels=class_labels,
                reduce_softmax=self._reduce_softmax,  # a data-parallel shard combines all processes' states
            )
        sqrt_a = alpha_prod_t.sqrt().clamp(min=1e-30).to(x_flat.dtype)[:, None]
        neighbours = self._neighbors.search(
            x_flat / sqrt_a,
            config.num_neighbors,
            self.images,
            config.chunk_size,
            config.faiss_index,
            config.ivf_threshold,
            config.ivf_nprobe,
            labels=self.labels,
            class_labels=class_labels,
        )
        return posterior_mean_over_neighbors(
            x_flat,
            alpha_prod_t,
            beta_prod_t,
            self.images_for_call(),
            stats,
            neighbours,
            config.chunk_size,
            config.temperature,
        )

    def _denoise(self, x_t, alpha_prod_t, beta_prod_t, generator=None, class_labels=None):
        # Notation: alpha_prod_t -> a, beta_prod_t -> 1 - a, num_noise -> M, smoothing_std -> sigma_s.
        config = self.config
        batch_size, num_noise = len(x_t), config.num_noise
        stats = self.image_stats()  # (mu, ||y_i - mu||^2), derived from the stored images
        x_flat = x_t.reshape(batch_size, -1)  # [B, D]
        if config.smoothing_std == 0:
            return self._optimal(x_flat, alpha_prod_t, beta_prod_t, stats, class_labels).reshape(x_t.shape)

        # 1. M perturbed copies x_t + sigma_s z_j, z_j drawn in order j = 0 .. M-1 from the call's generator(s).
        noise = torch.stack(
            [
                randn_tensor(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype).reshape(
                    batch_size, -1
                )
                for _ in range(num_noise)
            ]
        )  # [M, B, D]
        perturbed = (x_flat[None] + config.smoothing_std * noise).reshape(num_noise * batch_size, -1)  # [M*B, D]

        # 2. The optimal denoiser on all M*B copies at once (one GEMM stream), then 3. the average over j.
        repeat = lambda values: None if values is None else values.repeat(num_noise)  # noqa: E731
        x0_copies = self._optimal(
            perturbed, repeat(alpha_prod_t), repeat(beta_prod_t), stats, repeat(class_labels)
        )  # [M*B, D]
        return x0_copies.reshape(num_noise, batch_size, -1).mean(dim=0).reshape(x_t.shape)
