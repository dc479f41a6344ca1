"""The data-holding denoisers' shared part: the stored training images (and labels) as buffers, their reading in
`from_dataset`, their derived statistics, and data-parallel sharding as an explicit attached object."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers.utils import logging

from ..data import DATA_SOURCE_KEYWORDS
from ..kernels.online_softmax import OnlineSoftmax
from ..kernels.reductions import all_reduce_nearest, all_reduce_online_softmaxes
from ..kernels.stored_images import ANY_CLASS, DecodedImages, StoredImageStats, collect_images, image_storage
from .modeling_analytic import AnalyticDenoiserMixin

logger = logging.get_logger(__name__)


@dataclass
class DataParallelShard:
    """
    The stored images a data-parallel denoiser keeps: global indices `[start, stop)` of `num_images`, shard `index`
    of `num_shards`, and the communicator (`kernels.reductions.Communicator`) that combines the partial results.
    Attached by [`~diffusers_analytic.distributed.shard_for_data_parallel`].
    """

    index: int
    num_shards: int
    start: int
    stop: int
    num_images: int
    communicator: Any = field(default=None, repr=False)


class StoredImagesMixin(AnalyticDenoiserMixin):
    r"""
    Mixin of the denoisers that keep their training images y_1 .. y_N: an `images` buffer `[N, C, H, W]` in the
    storage dtype (uint8 for 8-bit sources: exact, 4x smaller than float32) and an optional int64 `labels` buffer
    `[N]`, shaped by the config (`num_images`, `storage_dtype`, `has_labels`) so that `config.json` + safetensors
    rebuild them. Use it first: `class OptimalDenoiser(StoredImagesMixin, ModelMixin, ConfigMixin)`.

    Data parallelism: a denoiser with `supports_data_parallel` can keep a contiguous share of its images
    ([`keep_image_shard`]); its `_reduce_*` methods then combine the partial results of all processes exactly, and
    `save_pretrained` refuses (a shard is not the model).
    """

    #: Whether [`keep_image_shard`] applies: the denoiser reduces its partial results with `_reduce_*`.
    supports_data_parallel = False
    #: Whether classifier-free guidance runs in one pass: the denoiser's `_denoise` takes rows labelled `ANY_CLASS`
    #: (the unconditional posterior is the class one without the class mask).
    guides_in_one_pass = False

    def _register_image_storage(self, num_images: int, storage_dtype: str, has_labels: bool) -> None:
        self.register_buffer("images", image_storage(num_images, self.sample_shape, storage_dtype))  # y [N, C, H, W]
        if has_labels:
            self.register_buffer("labels", torch.zeros(int(num_images), dtype=torch.int64))  # [N]
        else:
            self.labels = None
        self._image_stats = StoredImageStats()  # mean and centred norms of the images, derived at first use
        self._decoded_images = DecodedImages()  # a float32 copy of a small image set, made at first use
        self._shard: DataParallelShard | None = None
        self._shard_labels: torch.Tensor | None = None

    @classmethod
    def _read_images_for_storage(cls, images, batch_size: int, storage_dtype: str, config: dict):
        """
        Reads all images of a data source (data-source keywords are taken out of `config`). Returns `(images, labels
        or None, config)` with `config` completed by `num_images`, `storage_dtype`, `has_labels`, `in_channels` and
        `sample_size`.
        """
        data_kwargs = {key: config.pop(key) for key in DATA_SOURCE_KEYWORDS if key in config}
        stored, labels, dtype_name = collect_images(images, storage_dtype, batch_size=batch_size, **data_kwargs)
        config = {**config, "num_images": len(stored), "storage_dtype": dtype_name, "has_labels": labels is not None}
        return stored, labels, cls._config_for_data(tuple(stored.shape[1:]), config)

    def _copy_stored_images(self, images: torch.Tensor, labels: torch.Tensor | None) -> None:
        self.images.copy_(images)
        if labels is not None:
            self.labels.copy_(labels)

    @classmethod
    def _from_stored_images(cls, images, batch_size: int, storage_dtype: str, config: dict, name: str):
        """`from_dataset` of a denoiser that only stores its images: read them, build, copy them in, log."""
        stored, labels, config = cls._read_images_for_storage(images, batch_size, storage_dtype, config)
        denoiser = cls(**config)
        denoiser._copy_stored_images(stored, labels)
        logger.info(f"Stored {len(stored)} images ({config['storage_dtype']}) in {name}.")
        return denoiser

    def image_stats(self) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mu [D], ||y_i - mu||^2 [N])` of the stored images, computed at first use after the buffer changes."""
        return self._image_stats.get(self.images, int(self.config.get("chunk_size", 1024)))

    def images_for_call(self) -> torch.Tensor:
        """
        The stored images as a call reads them: a float32 model-space copy for a small set (see
        [`~kernels.stored_images.DecodedImages`]), else the buffer itself; the same posterior either way.
        """
        return self._decoded_images.get(self.images)

    def _known_labels(self) -> torch.Tensor | None:
        if self._shard is not None:
            return self._shard_labels  # every class of the whole data set, not only this shard's
        return super()._known_labels()

    def _denoise_guided(self, x_t, alpha_prod_t, beta_prod_t, generator, class_labels):
        if not self.guides_in_one_pass or self.config.get("num_neighbors") is not None:
            return super()._denoise_guided(x_t, alpha_prod_t, beta_prod_t, generator, class_labels)
        # The batch twice, the first copy restricted to no class: one pass over the images for both terms.
        rows = torch.cat([torch.full_like(class_labels, ANY_CLASS), class_labels])
        twice = lambda values: torch.cat([values, values])  # noqa: E731
        x0_hat = self._denoise(twice(x_t), twice(alpha_prod_t), twice(beta_prod_t), generator, class_labels=rows)
        return x0_hat.chunk(2)

    # ------------------------------------------------------------------ data parallelism
    @property
    def data_parallel_shard(self) -> DataParallelShard | None:
        """The shard this denoiser keeps, or None for an ordinary (whole) denoiser."""
        return self._shard

    def keep_image_shard(self, shard: DataParallelShard) -> None:
        """
        Keeps only images `[shard.start, shard.stop)` (copies, so the full tensors can be freed). What depends on all
        the images is fixed first: the class labels one may ask for, and the data mean the logits are centred on
        (shards must share it, else their logits differ by per-shard constants).
        """
        if not self.supports_data_parallel:
            raise ValueError(
                f"{type(self).__name__} does not support data-parallel denoising; it applies to the optimal, "
                "scfdm, nearest_dataset and pca_locality denoisers."
            )
        if self._shard is not None:
            raise ValueError(f"This {type(self).__name__} is already sharded ({self._shard}).")
        if self.config.get("num_neighbors") is not None:
            raise ValueError(
                f"Data-parallel denoising is exact only; this denoiser uses FAISS top-k (num_neighbors="
                f"{self.config.num_neighbors}); load it exact with `from_pretrained(..., num_neighbors=None)`."
            )
        if shard.num_images != len(self.images) or not 0 <= shard.start < shard.stop <= shard.num_images:
            raise ValueError(f"{shard} does not fit the {len(self.images)} stored images.")
        self._shard_labels = self._known_labels()
        self._image_stats.pin_mean(self.images, int(self.config.get("chunk_size", 1024)))
        self.images = self.images[shard.start : shard.stop].clone()
        if self.labels is not None:
            self.labels = self.labels[shard.start : shard.stop].clone()
        self._shard = shard

    def _reduce_softmaxes(self, states: list[OnlineSoftmax], shapes: list, device) -> list[OnlineSoftmax]:
        """The states over all processes' images (`kernels.reductions`); unchanged for an ordinary denoiser."""
        if self._shard is None:
            return states
        return all_reduce_online_softmaxes(states, self._shard.communicator, shapes, device)

    def _reduce_softmax(self, state: OnlineSoftmax, rows_shape=None, value_shape=None, device=None) -> OnlineSoftmax:
        shapes = None if rows_shape is None else [(rows_shape, value_shape)]
        return self._reduce_softmaxes([state], shapes, device)[0]

    def _reduce_nearest(self, scores: torch.Tensor, indices: torch.Tensor, images: torch.Tensor):
        """`(scores, global indices, images)` of the winners over all processes; this process's for a whole one."""
        if self._shard is None:
            return scores, indices, images
        return all_reduce_nearest(
            scores, indices.to(torch.int64) + self._shard.start, images, self._shard.communicator
        )

    def save_pretrained(self, *args, **kwargs):
        if self._shard is not None:
            raise ValueError(
                "This denoiser was sharded for data-parallel denoising and holds only part of the images; save the "
                "unsharded model instead."
            )
        return super().save_pretrained(*args, **kwargs)
