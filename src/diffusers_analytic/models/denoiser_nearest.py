"""Nearest-dataset denoiser: the training image nearest to x_t under the posterior-consistent distance
(docs/math.md)."""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..data import to_model_space
from ..kernels.empirical import nearest_indices
from .modeling_analytic import check_positive_int
from .stored_images import StoredImagesMixin


class NearestDatasetDenoiser(StoredImagesMixin, ModelMixin, ConfigMixin):
    r"""
    Returns the stored training image nearest to x_t:

        x0_hat = y_{i*},   i* = argmin_i ||x_t - sqrt(a) y_i||

    the tau -> 0 limit of the optimal denoiser's posterior. The distance compares x_t with the *scaled* image
    sqrt(a) y_i, as the forward process x_t = sqrt(a) x_0 + sqrt(1 - a) eps implies (the research reference compares
    with y_i unscaled, which picks a different image at high noise). Exact: streamed over chunks with one GEMM per
    chunk and precomputed norms, extra memory O(B * chunk_size + chunk_size * D). At a = 0 every image is equally
    far and the first one is returned. With labels stored, `class_labels=` restricts the search to each sample's
    class.

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): image height and width.
        in_channels (`int`, defaults to 3): channels per image.
        num_images (`int`, defaults to 1): N, the number of stored images (set by `from_dataset`).
        storage_dtype (`str`, defaults to `"float32"`): `"uint8"`, `"float16"` or `"float32"` image buffer.
        has_labels (`bool`, defaults to `False`): whether an int64 `labels` buffer `[N]` is stored.
        chunk_size (`int`, defaults to 4096): images per streamed chunk: the logits of a chunk, `[B, chunk_size]`
            float32, are the extra memory beside one ~2 MB piece of images (float32) and O(B D).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            The training noise schedule, as in diffusers' `DDIMScheduler`; the defaults equal `DDIMScheduler()`'s.
        prediction_type (`str`, defaults to `"epsilon"`): `"epsilon"`, `"v_prediction"` or `"sample"`.
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
        chunk_size: int = 4096,
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
        check_positive_int("chunk_size", chunk_size)
        self._register_image_storage(num_images, storage_dtype, has_labels)  # images [N, C, H, W], labels [N]

    @classmethod
    def from_dataset(
        cls, images, batch_size: int = 256, storage_dtype: str = "auto", show_progress: bool = True, **config
    ) -> NearestDatasetDenoiser:
        r"""
        Stores the training images (and their labels, when the source has them); arguments as in
        [`OptimalDenoiser.from_dataset`].
        """
        return cls._from_stored_images(images, batch_size, storage_dtype, config, "a nearest-dataset denoiser")

    def estimated_flops(self, batch_size: int) -> float:
        """One GEMM of the batch against all N images: 2 B N D."""
        return 2.0 * batch_size * len(self.images) * math.prod(self.sample_shape)

    def _denoise(self, x_t, alpha_prod_t, beta_prod_t, generator=None, class_labels=None):
        # Notation: alpha_prod_t -> a, images -> y_1 .. y_N.
        stats = self.image_stats()  # (mu, ||y_i - mu||^2), derived from the stored images
        images = self.images_for_call()  # (a float32 copy for a small set)
        # 1. i* = argmin_i ||x_t - sqrt(a) y_i||^2, streamed (restricted to each sample's class when asked).
        nearest, scores = nearest_indices(
            x_t.reshape(len(x_t), -1),
            alpha_prod_t,
            images,
            stats,
            self.config.chunk_size,
            labels=self.labels,
            class_labels=class_labels,
        )  # [B], [B]
        # 2. x0_hat = y_{i*}, converted from the stored dtype (a data-parallel shard takes the winner over all shards).
        x0_hat = to_model_space(images[nearest], torch.float32)
        return self._reduce_nearest(scores, nearest, x0_hat)[2]
