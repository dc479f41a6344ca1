"""Equivariant local score (ELS) machine: a per-pixel posterior over all training patches from all locations
(Kamb & Ganguli, "An analytic theory of creativity in convolutional diffusion models", ICML 2025, arXiv 2412.20292)."""

from __future__ import annotations

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..data import to_model_space
from ..kernels.online_softmax import OnlineSoftmax
from ..kernels.patches import (
    image_patches,
    pad_images,
    patch_logit_coefficients,
    patch_position_groups,
    resolve_training_patches,
)
from ..kernels.stored_images import StoredImageMean
from .patch_schedule import PatchMachineMixin


class EquivariantLocalScoreDenoiser(PatchMachineMixin, ModelMixin, ConfigMixin):
    r"""
    The equivariant local score (ELS) machine of Kamb & Ganguli (arXiv 2412.20292), the closed form that best predicts
    trained convolutional diffusion models. Each output pixel p is the posterior mean of the centre of a patch, when
    the k x k patch around p is observed and the prior is uniform over the training patches q_j taken from every
    location of every training image:

        w_p(j) = softmax_j( -||P_p(x_t) - sqrt(a) q_j||^2 / (2 (1 - a)) ),   x0_hat[p] = sum_j w_p(j) center(q_j)

    P_p(x_t) is the k x k patch (all channels) around p of x_t padded by r = k // 2 (`padding`). The training patches
    (`training_patches`, and `boundary_aware` with zero padding):

    - `padding="circular"`, `training_patches="wrapped"` (the default with circular padding): all H W (wrapped)
      patches of each image. The machine commutes with circular shifts.
    - `padding="circular"`, `training_patches="valid"`: the query is padded circularly, the training patches are the
      (H - k + 1) (W - k + 1) valid patches (inside the image, no wrap-around) of each image.
    - `padding="zeros"`: the valid patches of each image.
    - `padding="zeros"`, `boundary_aware=True` (the paper's best variant for zero-padded networks): a pixel is
      grouped by how far its window overflows each border, per row (max(0, r - y), max(0, y + r - (H - 1))) and
      likewise per column, and compared only with patches of the zero-padded training images at positions of the
      same group: interior pixels with all valid patches, a pixel at distance d from one edge with the patches at
      distance d from that edge anywhere along it, a corner pixel with the patches at that corner. From
      k >= max(H, W) on every pixel is its own group and the machine equals the LS machine.

    With valid patches only, a k larger than the image has no training patch and is capped at the largest odd size
    <= min(H, W).

    Which of the authors' machines (github.com/Kambm/convolutional_diffusion, `utils/idealscore.py`) and networks each
    variant models:

    - `padding="zeros", boundary_aware=True`: `LocalEquivBordersScoreModule` ("bbELS"), their zero-padded ResNets
      and UNets (presets `*_unet`, `*_resnet`).
    - `padding="circular", training_patches="valid"`: `LocalEquivScoreModule` ("ELS"), their circular-padding
      ResNets (presets `mnist_resnet_circular`, `cifar10_resnet_circular`).
    - `padding="circular", training_patches="wrapped"`: the exactly translation-equivariant machine of a
      circular-padding network on the torus; not one of the authors' machines.
    - `padding="zeros"` without `boundary_aware`: valid patches for every pixel; not one of the authors' machines.

    A reproduction of their code should not copy two details: in `LocalEquivBordersScoreModule` the interior values
    `x[:, None:, ...]` are a slice, not a new axis, so the result is right only for a batch of one query; and
    `LocalEquivScoreModule` adds up `torch.mean` over the patches of each loader batch of images, which weights the
    patches of a short last batch (and, with a class label, of every batch holding fewer images of that class) more
    than the others. Here one softmax runs over all training patches, whatever `chunk_size` and the batch size.

    Computation (exact): with a per-channel data mean m subtracted from the padded query (scaled by sqrt(a)) and
    from the patches, the distance is unchanged and ||P_p(x')||^2 cancels per pixel, so the logits are
    c1 <P_p(x'), q'_j> - c2 ||q'_j||^2: one matrix product of the query's patches with the training patches, i.e. the
    convolution of x_t with every training patch as a filter. It is streamed over chunks of `chunk_size` patches with
    a per-pixel online softmax; cost per call about B H W M C k^2 multiply-adds for M training patches.

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): image height and width.
        in_channels (`int`, defaults to 3): channels per image.
        num_images (`int`, defaults to 1): N, the number of stored images (set by `from_dataset`).
        storage_dtype (`str`, defaults to `"float32"`): image buffer dtype: `"uint8"` (0..255, exact for 8-bit data),
            `"float16"` (model space, ~1e-3 relative rounding) or `"float32"`.
        has_labels (`bool`, defaults to `False`): whether an int64 `labels` buffer `[N]` is stored; `class_labels=`
            then restricts each sample's posterior to the patches of its class's images.
        patch_size_schedule (`int`, `str` or `list`, defaults to `"cifar10_unet"`): a constant odd k, a preset name
            (`"cifar10_unet"`, `"cifar10_resnet"`, `"mnist_unet"`, `"fashion_mnist_unet"`, `"celeba_unet"`,
            `"default"`), or `[[log_snr, k], ...]` breakpoints, low noise first (see `patch_schedule`).
        padding (`str`, defaults to `"zeros"`): `"zeros"` or `"circular"`.
        training_patches (`str`, *optional*): which training patches a pixel is compared with: `"wrapped"` (circular
            padding only, its default) or `"valid"` (the default, and only choice, with zero padding). The resolved
            value is written into the config.
        boundary_aware (`bool`, defaults to `False`): with zero padding, match border patches only with training
            patches from the same border position (rule above). `from_dataset` turns it on with zero padding unless
            it is given.
        chunk_size (`int`, defaults to 4096): training patches per streamed chunk; the extra memory is
            O(B * H * W * chunk_size) floats.
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
        num_images: int = 1,
        storage_dtype: str = "float32",
        has_labels: bool = False,
        patch_size_schedule: int | str | list = "cifar10_unet",
        padding: str = "zeros",
        boundary_aware: bool = False,
        training_patches: str | None = None,
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
        if boundary_aware and padding != "zeros":
            raise ValueError(
                f"`boundary_aware=True` needs zero padding (circular images have no border), got {padding!r}."
            )
        # Checks `padding` too; the resolved value goes into the config, so a saved machine names its patches.
        self.register_to_config(training_patches=resolve_training_patches(padding, training_patches))
        self._init_patch_machine()  # checks the schedule and chunk size; buffers `images` [N, C, H, W], `labels` [N]
        self._mean = StoredImageMean(per_channel=True)
        self._groups: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}

    @classmethod
    def from_dataset(
        cls, images, batch_size: int = 256, storage_dtype: str = "auto", show_progress: bool = True, **config
    ) -> EquivariantLocalScoreDenoiser:
        r"""
        Stores the training images (and their labels, when the source has them); patches are cut on the fly.

        Args:
            images: anything [`~diffusers_analytic.data.iter_image_batches`] reads: a float tensor `[N, C, H, W]` in
                `[-1, 1]`, a uint8 tensor in `[0, 255]`, an `ImageSet`, a `datasets.Dataset`, an iterable of batches.
            batch_size (`int`, defaults to 256): images per batch while reading.
            storage_dtype (`str`, defaults to `"auto"`): `"auto"` keeps 8-bit sources as uint8 (exact) and floats as
                float32; or `"uint8"`, `"float16"`, `"float32"`.
            show_progress (`bool`, defaults to `True`): accepted for the same signature as the other denoisers;
                storing is one pass over the data, without a progress bar.
            **config: `patch_size_schedule`, `padding`, `boundary_aware`, `training_patches`, `chunk_size`, the
                schedule, `prediction_type`; data-source options `labels`, `image_column`, `label_column`,
                `resolution`, `channels`.

        Settings left out are chosen from the data, written into the config and logged (explicit keywords win): the
        patch-size schedule of the image size (`patch_schedule.default_patch_size_schedule`: `"mnist_unet"` below
        28 px, `"cifar10_unet"` at 28-32 px, cifar10_unet's sizes scaled by S / 32 above), and with zero padding
        `boundary_aware=True` (valid patches alone give textures, even on 8x8 digits).
        """
        name = "an equivariant local score (ELS) machine"
        return cls._fit_patch_machine(images, batch_size, storage_dtype, config, name)

    @classmethod
    def _data_defaults(cls, config: dict) -> tuple[dict, list[str]]:
        # The patch-size schedule of the image size; with zero padding, the boundary-aware rule unless the caller
        # chose: valid patches alone send every border pixel to interior patches (textures, even on 8x8 digits).
        chosen, notes = super()._data_defaults(config)
        if config.get("padding", "zeros") == "zeros" and "boundary_aware" not in config:
            chosen["boundary_aware"] = True
            notes.append("boundary_aware=True (zero padding: the authors' machine for zero-padded networks)")
        return chosen, notes

    def effective_patch_size(self, patch_size: int) -> int:
        height, width = self.image_size
        if self.config.training_patches == "valid" and not self.config.boundary_aware:
            # No valid patch exists beyond the image size: the largest odd size that fits.
            largest = min(height, width) if min(height, width) % 2 == 1 else min(height, width) - 1
            return min(patch_size, largest)
        if self.config.padding == "zeros":
            # Every pixel is its own group from max(H, W) on, and from 2 max(H, W) - 1 on every window covers the
            # image: larger sizes only add zeros to every patch.
            return min(patch_size, 2 * max(height, width) - 1)
        return patch_size

    def position_groups(self, patch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """`(query positions, training positions)` pairs for patch size k (see `patch_position_groups`)."""
        if patch_size not in self._groups:
            config = self.config
            self._groups[patch_size] = patch_position_groups(
                *self.image_size, patch_size, config.padding, config.boundary_aware, config.training_patches
            )
        return self._groups[patch_size]

    def num_training_patches(self, patch_size: int) -> int:
        """M, the number of training patches a query pixel of the interior is compared with at patch size k."""
        groups = self.position_groups(self.effective_patch_size(patch_size))
        return len(self.images) * max(len(train_positions) for _, train_positions in groups)

    def estimated_flops(self, batch_size: int) -> float:
        """
        Every query pixel's patch (C k^2 values, k the largest of the schedule) against the patches of every stored
        image at every training position (at most H W): about 2 B N (H W)^2 C k_max^2.
        """
        channels, height, width = self.sample_shape
        k = self.largest_patch_size()
        return 2.0 * batch_size * len(self.images) * (height * width) ** 2 * channels * k * k

    def _denoise_patch(self, x_t, alpha_prod_t, beta_prod_t, patch_size, class_labels=None):
        # Notation: alpha_prod_t -> a, beta_prod_t -> 1 - a, patch_size -> k, training patches -> q_j.
        config = self.config
        batch_size, channels, height, width = x_t.shape
        radius = patch_size // 2
        device = x_t.device
        mean = self._mean.get(self.images).to(device)[:, None, None]  # m  [C, 1, 1]
        c1, c2 = patch_logit_coefficients(alpha_prod_t, beta_prod_t)  # [B]
        c1, c2 = c1.to(device), c2.to(device)[:, None, None]
        sqrt_a = alpha_prod_t.double().sqrt().float().to(device)[:, None, None, None]

        # 1. The query's patches, padded then centred: P_p(x_t) - sqrt(a) m, pre-scaled by c1 = sqrt(a) / (1 - a).
        padded = pad_images(x_t, radius, config.padding) - sqrt_a * mean  # [B, C, H + 2r, W + 2r]
        query = image_patches(padded, patch_size) * c1[:, None, None]  # [B, H W, C k k]
        groups = [(q.to(device), t.to(device)) for q, t in self.position_groups(patch_size)]
        softmaxes = [OnlineSoftmax() for _ in groups]
        if class_labels is not None:
            class_labels = class_labels.to(device)

        images_per_chunk = max(1, config.chunk_size // max(len(t) for _, t in groups))
        for start in range(0, len(self.images), images_per_chunk):
            stored = self.images[start : start + images_per_chunk].to(device)
            chunk = to_model_space(stored)  # y  [n, C, H, W]
            # 2. Training patches q'_j of the chunk's images (padded by the same rule, then centred; valid patches never
            #    reach the padding) and their centres.
            chunk_patches = image_patches(
                pad_images(chunk, radius, config.padding) - mean, patch_size
            )  # [n, H W, C k k]
            centers = (chunk - mean).flatten(2).transpose(1, 2)  # center(q'_j) per position  [n, H W, C]
            labels = None if class_labels is None else self.labels[start : start + len(chunk)].to(device)
            for (query_positions, train_positions), softmax in zip(groups, softmaxes):
                patches = chunk_patches[:, train_positions].reshape(-1, chunk_patches.shape[-1])  # [M_c, C k k]
                patch_centers = centers[:, train_positions].reshape(-1, channels)  # [M_c, C]
                group_query = query[:, query_positions]  # [B, P, C k k]
                for lo in range(0, len(patches), config.chunk_size):
                    q = patches[lo : lo + config.chunk_size]  # [m, C k k]
                    q_centers = patch_centers[lo : lo + config.chunk_size]  # [m, C]
                    # 3. logits_p(j) = c1 <P_p(x'), q'_j> - c2 ||q'_j||^2 (||P_p(x')||^2 cancels per pixel).
                    bias = -c2 * q.square().sum(dim=1)  # [B, 1, m]
                    logits = torch.baddbmm(bias, group_query, q.T.expand(batch_size, -1, -1))  # [B, P, m]
                    if labels is not None:
                        patch_labels = labels.repeat_interleave(len(train_positions))[lo : lo + len(q)]  # [m]
                        other_class = patch_labels[None, :] != class_labels[:, None]  # [B, m]
                        logits.masked_fill_(other_class[:, None, :], float("-inf"))
                    # 4. Per-pixel online softmax: sum_j w_p(j) center(q'_j).
                    softmax.update(logits, lambda weights, c=q_centers: weights @ c)  # [B, P, C]

        x0_hat = torch.empty(batch_size, height * width, channels, device=device)
        for (query_positions, _), softmax in zip(groups, softmaxes):
            x0_hat[:, query_positions] = softmax.result()  # [B, P, C]
        # 5. Back to image layout, adding the mean removed from the centres.
        return x0_hat.transpose(1, 2).reshape(batch_size, channels, height, width) + mean
