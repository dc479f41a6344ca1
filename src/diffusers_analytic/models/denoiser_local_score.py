"""Local score (LS) machine: a per-pixel posterior over the training images that sees only a k x k patch
(Kamb & Ganguli, "An analytic theory of creativity in convolutional diffusion models", ICML 2025, arXiv 2412.20292)."""

from __future__ import annotations

import math

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from ..data import to_model_space
from ..kernels.online_softmax import OnlineSoftmax
from ..kernels.patches import PATCH_PADDINGS, box_sum, patch_logit_coefficients
from ..kernels.stored_images import StoredImageMean
from .patch_schedule import PatchMachineMixin


class LocalScoreDenoiser(PatchMachineMixin, ModelMixin, ConfigMixin):
    r"""
    The local score (LS) machine of Kamb & Ganguli (arXiv 2412.20292): each output pixel p is the posterior mean of
    that pixel when only the k x k patch around p is observed, with the patch compared at the same location in every
    training image y_1 .. y_N:

        w_p(i) = softmax_i( -||P_p(x_t) - sqrt(a) P_p(y_i)||^2 / (2 (1 - a)) ),   x0_hat[p] = sum_i w_p(i) y_i[p]

    P_p(z) is the k x k patch (all channels) around p of z padded by r = k // 2 on each side; x_t and every y_i are
    padded by the same rule (`padding`: zeros, or circular wrap-around), so both patches have the same size and, with
    zero padding, positions outside the image add nothing to the distance. With k >= 2 max(H, W) - 1 and zero padding
    every patch covers the whole image and LS equals the optimal (empirical Bayes) denoiser.

    Computation (exact, streamed over chunks of `chunk_size` images with a per-pixel online softmax): with the per-pixel
    data mean mu, x' = x_t - sqrt(a) mu and y'_i = y_i - mu (the distance is unchanged), the distance is a k x k box
    sum of ||x' - sqrt(a) y'_i||^2 over channels; the ||x'||^2 part is the same for every i and cancels, leaving
    box(x'.y'_i) and box(||y'_i||^2), each a separable box filter. Cost per call O(B N C H W + B N H W k).

    The patch size k follows `patch_size_schedule` (log-SNR breakpoints, see
    [`~diffusers_analytic.models.patch_schedule`]), so it changes with the noise level and works with any scheduler.

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): image height and width.
        in_channels (`int`, defaults to 3): channels per image.
        num_images (`int`, defaults to 1): N, the number of stored images (set by `from_dataset`).
        storage_dtype (`str`, defaults to `"float32"`): image buffer dtype: `"uint8"` (0..255, exact for 8-bit data),
            `"float16"` (model space, ~1e-3 relative rounding) or `"float32"`.
        has_labels (`bool`, defaults to `False`): whether an int64 `labels` buffer `[N]` is stored; `class_labels=`
            then restricts each sample's posterior to its class.
        patch_size_schedule (`int`, `str` or `list`, defaults to `"cifar10_unet"`): a constant odd k, a preset name
            (`"cifar10_unet"`, `"cifar10_resnet"`, `"mnist_unet"`, `"fashion_mnist_unet"`, `"celeba_unet"`,
            `"default"`), or `[[log_snr, k], ...]` breakpoints, low noise first (see `patch_schedule`).
        padding (`str`, defaults to `"zeros"`): how patches extend past the border: `"zeros"` or `"circular"`.
        chunk_size (`int`, defaults to 256): training images per streamed chunk; the extra memory is
            O(B * chunk_size * H * W) floats.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            The training noise schedule, as in diffusers' `DDIMScheduler`; the defaults equal `DDIMScheduler()`'s.
        prediction_type (`str`, defaults to `"epsilon"`): what `forward` returns: `"epsilon"`, `"v_prediction"` or
            `"sample"` (x0).
    """

    #: Window sums and per-pixel softmaxes over `[B, n, H, W]` maps stream memory: measured at 2-5% of the GEMM rate
    #: on a CPU (its `estimated_flops` per second; benchmarks/README.md, the scale table).
    gemm_rate_fraction = 0.03

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
        chunk_size: int = 256,
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
        if padding not in PATCH_PADDINGS:
            raise ValueError(f"`padding` must be one of {PATCH_PADDINGS}, got {padding!r}.")
        self._init_patch_machine()  # checks the schedule and chunk size; buffers `images` [N, C, H, W], `labels` [N]
        self._mean = StoredImageMean(per_channel=False)

    @classmethod
    def from_dataset(
        cls, images, batch_size: int = 256, storage_dtype: str = "auto", show_progress: bool = True, **config
    ) -> LocalScoreDenoiser:
        r"""
        Stores the training images (and their labels, when the source has them).

        Args:
            images: anything [`~diffusers_analytic.data.iter_image_batches`] reads: a float tensor `[N, C, H, W]` in
                `[-1, 1]`, a uint8 tensor in `[0, 255]`, an `ImageSet`, a `datasets.Dataset`, an iterable of batches.
            batch_size (`int`, defaults to 256): images per batch while reading.
            storage_dtype (`str`, defaults to `"auto"`): `"auto"` keeps 8-bit sources as uint8 (exact) and floats as
                float32; or `"uint8"`, `"float16"`, `"float32"`.
            show_progress (`bool`, defaults to `True`): accepted for the same signature as the other denoisers;
                storing is one pass over the data, without a progress bar.
            **config: `patch_size_schedule`, `padding`, `chunk_size`, the schedule, `prediction_type`; data-source
                options `labels`, `image_column`, `label_column`, `resolution`, `channels`.

        Settings left out are chosen from the data, written into the config and logged (explicit keywords win): the
        patch-size schedule of the image size (`patch_schedule.default_patch_size_schedule`: `"mnist_unet"` below
        28 px, `"cifar10_unet"` at 28-32 px, cifar10_unet's sizes scaled by S / 32 above).
        """
        return cls._fit_patch_machine(images, batch_size, storage_dtype, config, "a local score (LS) machine")

    def effective_patch_size(self, patch_size: int) -> int:
        # With zero padding a window of 2 max(H, W) - 1 already covers the image from every pixel; larger sizes only
        # add zeros to both patches and give the same result.
        if self.config.padding == "zeros":
            return min(patch_size, 2 * max(self.image_size) - 1)
        return patch_size

    def estimated_flops(self, batch_size: int) -> float:
        """
        Per stored image and pixel, the patch distance as window sums of the cross and data terms (separable, about
        4 k operations each for the largest k of the schedule) and the weighted value: about 4 B N D k_max.
        """
        return 4.0 * batch_size * len(self.images) * math.prod(self.sample_shape) * self.largest_patch_size()

    def _denoise_patch(self, x_t, alpha_prod_t, beta_prod_t, patch_size, class_labels=None):
        # Notation: alpha_prod_t -> a, beta_prod_t -> 1 - a, images -> y_1 .. y_N, patch_size -> k.
        config = self.config
        batch_size, channels, height, width = x_t.shape
        mean = self._mean.get(self.images).to(x_t.device)  # mu  [C, H, W]
        c1, c2 = patch_logit_coefficients(alpha_prod_t, beta_prod_t)  # [B]
        c1, c2 = c1.to(x_t.device)[:, None, None, None], c2.to(x_t.device)[:, None, None, None]
        sqrt_a = alpha_prod_t.double().sqrt().float().to(x_t.device)[:, None, None, None]

        # 1. Centre: x' = x_t - sqrt(a) mu (y'_i = y_i - mu below); distances do not change.
        query = x_t - sqrt_a * mean  # [B, C, H, W]
        if class_labels is not None:
            class_labels = class_labels.to(x_t.device)
        softmax = OnlineSoftmax()
        for start in range(0, len(self.images), config.chunk_size):
            stored = self.images[start : start + config.chunk_size].to(x_t.device)
            chunk = to_model_space(stored) - mean  # y'  [n, C, H, W]
            # 2. logits_p(i) = c1 box(x'.y'_i)[p] - c2 box(||y'_i||^2)[p], c1 = sqrt(a) / (1 - a), c2 = a / (2 (1 - a))
            #    (the box sums run over the padded k x k window; box(||x'||^2) is the same for every i and cancels).
            cross = torch.einsum("bchw,nchw->bnhw", query, chunk)  # x'.y'_i per pixel  [B, n, H, W]
            cross = box_sum(cross.reshape(-1, height, width), patch_size, config.padding).reshape(cross.shape)
            sq_norms = box_sum(chunk.square().sum(dim=1), patch_size, config.padding)  # [n, H, W]
            logits = c1 * cross - c2 * sq_norms  # [B, n, H, W]
            if class_labels is not None:
                other_class = self.labels[start : start + len(chunk)].to(x_t.device)[None, :] != class_labels[:, None]
                logits.masked_fill_(other_class[:, :, None, None], float("-inf"))
            # 3. Per-pixel online softmax over images: x0_hat[p] = sum_i w_p(i) y'_i[p] (+ mu).
            softmax.update(
                logits.permute(0, 2, 3, 1),  # [B, H, W, n]
                lambda weights, chunk=chunk: torch.einsum("bhwn,nchw->bhwc", weights, chunk),
            )
        return softmax.result().permute(0, 3, 1, 2) + mean  # [B, C, H, W]
