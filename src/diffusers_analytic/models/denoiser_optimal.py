"""Optimal (empirical Bayes) denoiser: the exact posterior mean under the empirical distribution of the training
images (docs/math.md)."""

from __future__ import annotations

import math

from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..kernels.empirical import posterior_mean, posterior_mean_over_neighbors
from ..kernels.knn import NeighborIndex, check_neighbor_config
from .modeling_analytic import check_finite_positive, check_positive_int
from .stored_images import StoredImagesMixin


class OptimalDenoiser(StoredImagesMixin, ModelMixin, ConfigMixin):
    r"""
    The "ideal" denoiser: the posterior mean of x_0 given x_t when the data distribution is the empirical one,
    uniform over the training images y_1 .. y_N:

        w_i = softmax_i( -||x_t - sqrt(a) y_i||^2 / (2 (1 - a) tau) ),   x0_hat = sum_i w_i y_i

    Exact by default: the softmax is streamed over chunks of `chunk_size` images with an online softmax (running max,
    running sum, running weighted sum); the squared distance is one GEMM per chunk plus precomputed ||y_i||^2
    (||x_t||^2 cancels). The result equals the one-shot softmax over all N to float32 rounding, for any chunk size,
    with extra memory O(B * chunk_size + B * D) plus one ~2 MB piece of images whatever N. Sampling with it memorizes: every sample lands on
    a training image (Karras et al. 2022, appendix; Kadkhodaie et al. 2024).

    The images are a buffer saved with the model (`storage_dtype`: uint8 for 8-bit sources, exact and 4x smaller than
    float32). With labels stored (`has_labels`), `class_labels=` restricts each sample's posterior to its class.

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): image height and width.
        in_channels (`int`, defaults to 3): channels per image.
        num_images (`int`, defaults to 1): N, the number of stored images (set by `from_dataset`).
        storage_dtype (`str`, defaults to `"float32"`): dtype of the image buffer: `"uint8"` (values 0..255, exact
            for 8-bit data), `"float16"` (model space, ~1e-3 relative rounding) or `"float32"`. A speed/memory
            trade-off without accuracy cost for 8-bit data: uint8 pieces are cast to float32 at every call (into one
            reused buffer), float32 storage is read in place for 4x the memory (`benchmarks/bench_optimal.py`).
        has_labels (`bool`, defaults to `False`): whether an int64 `labels` buffer `[N]` is stored.
        temperature (`float`, defaults to 1.0): tau > 0 divides the logits; 1 is the exact posterior mean, tau -> 0
            tends to the nearest image, tau > 1 blends more images.
        num_neighbors (`int`, *optional*): approximate mode: the softmax runs over the k nearest images found by a
            FAISS index (query x_t / sqrt(a)) instead of all N. With the default flat index the k are the true
            nearest, so the only error is the weight of the images left out (large at high noise, where the
            posterior is broad); `None` is exact. Must be in [1, N].
        chunk_size (`int`, defaults to 4096): images per streamed chunk: the logits of a chunk, `[B, chunk_size]`
            float32, are the extra memory beside one ~2 MB piece of images (float32) and O(B D).
        faiss_index (`str`, defaults to `"auto"`): top-k index kind: `"flat"` (exact search), `"ivf"` (approximate),
            `"auto"` (flat up to `ivf_threshold` images). The index is built from the stored images at first use
            (never saved).
        ivf_threshold (`int`, defaults to 100000): `"auto"` switches to IVF above this many images.
        ivf_nprobe (`int`, defaults to 32): IVF lists probed per query (more: slower, closer to exact).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            The training noise schedule, as in diffusers' `DDIMScheduler`; the defaults equal `DDIMScheduler()`'s.
        prediction_type (`str`, defaults to `"epsilon"`): what `forward` returns: `"epsilon"`, `"v_prediction"` or
            `"sample"` (x0).
    """

    supports_data_parallel = True
    guides_in_one_pass = True

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        num_images: int = 1,
        storage_dtype: str = "float32",
        has_labels: bool = False,
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
        check_positive_int("chunk_size", chunk_size)
        check_neighbor_config(num_neighbors, num_images, faiss_index)
        self._register_image_storage(num_images, storage_dtype, has_labels)  # images [N, C, H, W], labels [N]
        self._neighbors = NeighborIndex()

    @classmethod
    def from_dataset(
        cls, images, batch_size: int = 256, storage_dtype: str = "auto", show_progress: bool = True, **config
    ) -> OptimalDenoiser:
        r"""
        Stores the training images (and their labels, when the source has them).

        Args:
            images: anything [`~diffusers_analytic.data.iter_image_batches`] reads: a float tensor `[N, C, H, W]` in
                `[-1, 1]`, a uint8 tensor in `[0, 255]`, an `ImageSet`, a `datasets.Dataset`, an iterable of batches.
            batch_size (`int`, defaults to 256): images per batch while reading.
            storage_dtype (`str`, defaults to `"auto"`): `"auto"` keeps 8-bit sources as uint8 (exact) and floats as
                float32; or `"uint8"`, `"float16"`, `"float32"`.
            show_progress (`bool`, defaults to `True`): accepted for the same signature as the other denoisers;
                storing is a single pass over the data, without a progress bar.
            **config: the method parameters (`temperature`, `num_neighbors`, `chunk_size`, ...), the schedule,
                `prediction_type`; data-source options `labels`, `image_column`, `label_column`, `resolution`,
                `channels`. `sample_size`, `in_channels`, `num_images`, `storage_dtype`, `has_labels` come from
                the data.
        """
        return cls._from_stored_images(images, batch_size, storage_dtype, config, "an optimal denoiser")

    def estimated_flops(self, batch_size: int) -> float:
        """Exact: the logits and the weighted sum over all N images, 4 B N D; top-k: the flat search over all N
        (2 B N D) and both products over the k found (4 B k D)."""
        dim, count = math.prod(self.sample_shape), len(self.images)
        if self.config.num_neighbors is None:
            return 4.0 * batch_size * count * dim
        return 2.0 * batch_size * count * dim + 4.0 * batch_size * self.config.num_neighbors * dim

    def _denoise(self, x_t, alpha_prod_t, beta_prod_t, generator=None, class_labels=None):
        # Notation: alpha_prod_t -> a, beta_prod_t -> 1 - a, temperature -> tau, images -> y_1 .. y_N.
        config = self.config
        stats = self.image_stats()  # (mu, ||y_i - mu||^2), derived from the stored images
        x_flat = x_t.reshape(len(x_t), -1)  # [B, D]
        if config.num_neighbors is None:
            # Exact: softmax over all N images (or all of each sample's class), streamed.
            x0_hat = posterior_mean(
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
            return x0_hat.reshape(x_t.shape)

        # Top-k: the k nearest images of x_t / sqrt(a) (the ranking of ||x_t - sqrt(a) y_i||), then the exact
        # logits over those k only. (At a = 0 every image is equally far, and any k are as good as any other.)
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
        x0_hat = posterior_mean_over_neighbors(
            x_flat,
            alpha_prod_t,
            beta_prod_t,
            self.images_for_call(),
            stats,
            neighbours,
            config.chunk_size,
            config.temperature,
        )  # [B, D]
        return x0_hat.reshape(x_t.shape)
