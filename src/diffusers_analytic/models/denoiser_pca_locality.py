"""PCA-locality denoiser (Lukoianov et al. 2025, arXiv 2509.09672): per-pixel posterior means under Wiener-derived
locality masks (docs/math.md), exact over all stored images."""

from __future__ import annotations

import math
from collections import OrderedDict

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from diffusers.utils import logging

from ..kernels.empirical import posterior_mean
from ..kernels.moments import covariance_eigenbasis, fit_moments
from ..kernels.online_softmax import OnlineSoftmax
from ..kernels.schedule import MIN_BETA_PROD
from ..kernels.stored_images import STORAGE_DTYPES, CacheLock, buffer_key, image_chunks
from .modeling_analytic import check_finite_positive
from .pca_mask import LocalityMask, pca_locality_mask, prepare_locality_mask
from .stored_images import StoredImagesMixin

logger = logging.get_logger(__name__)

# The dense formulation's GEMM `[B n, D] x [D, D]` takes n = DENSE_PIECE_ROWS / B images at a time (3 buffers of
# B n D floats: 25 MB each at D = 3072).
DENSE_PIECE_ROWS = 2048


class PCALocalityDenoiser(StoredImagesMixin, ModelMixin, ConfigMixin):
    r"""
    PCA-locality denoiser of [Lukoianov et al. 2025](https://arxiv.org/abs/2509.09672): every output pixel p is the
    posterior mean of pixel p under the empirical distribution of the stored images, seen through a locality mask
    derived from the Wiener filter of the data's Gaussian fit (mean mu, unbiased covariance S = U diag(lam) U^T):

        W_t = U diag( a lam / (a lam + 1 - a) ) U^T
        R[q, p] = W_t[q, p] / W_t[q, q]                      (row q divided by its diagonal; |W_qq| < 1e-6 -> 1)
        M[q, p] = 1 if |R[q, p]| >= mask_threshold * max |R| else 0     (global max; mask_threshold = 0: M = R)
        d_p(i)  = sum_q M[q, p] (x_t[q] - sqrt(a) y_i[q])^2
        x0_hat[p] = sum_i softmax_i( -d_p(i) / (2 (1 - a) tau) ) y_i[p]

    The softmax runs over all N stored images exactly (an online softmax over data chunks: the result does not depend
    on `chunk_size` or on the order of the data). The reference implementation averages per-batch softmaxes, which is
    exact only when the whole data set is one batch.

    Speed: the mask of a noise level is computed once (one symmetric float64 D x D product) and cached (an LRU of
    `mask_cache_size` noise levels keyed by `a`) with the evaluation a cost model picks for it
    ([`~models.pca_mask.prepare_locality_mask`]). An all-ones mask (high noise) is the optimal denoiser: one
    `[B, D] x [D, n]` GEMM per chunk. Otherwise the logits are the per-input terms
    z[b, i, q] = (2 sqrt(a) x_t[q] - a y_i[q]) y_i[q] / (2 (1 - a) tau) against M, for every pixel at once:

    - dense: one GEMM `[B n, D] x [D, D]` per piece of n images, B N D^2 multiply-adds at the GEMM rate;
    - sparse (few non-zeros, low noise): CSR M^T times z^T `[D, B n]`, B nnz(M) multiply-adds per image;
    - complement (nearly full masks): the row sum of z (the full distance) minus CSR (1 - M)^T times z^T;
    - tiles: blocks of neighbouring pixels that share a small support (or complement support) read only that
      support, a GEMM `[B P, K] x [K, n]` per tile and a data term shared by the batch.

    A CSR product runs at memory speed, about a tenth of the GEMM's multiply-add rate on a CPU, so it pays only below
    about 10% non-zeros (of M or of 1 - M); soft masks (`mask_threshold = 0`) and devices without a measured sparse
    rate stay dense. On natural 32x32 patches the masks are 10-90% full between t = 600 and t = 100, where the dense
    GEMM runs; the query term sum_q M[q, p] x_t[q]^2 cancels in the softmax on every path.

    Args:
        sample_size (`int` or `(int, int)`, defaults to 32): image height and width.
        in_channels (`int`, defaults to 3): channels per image.
        num_images (`int`, defaults to 2): N, the number of stored images (set by `from_dataset`; fixes the buffer
            shape for `from_pretrained`).
        storage_dtype (`str`, defaults to `"uint8"`): dtype of the stored images: `"uint8"` (`[0, 255]`, exact for
            8-bit sources), `"float16"` (model space, about 1e-3 relative rounding) or `"float32"`.
        has_labels (`bool`, defaults to `False`): whether class labels are stored; then `class_labels=` restricts the
            posterior to the images of the requested class.
        temperature (`float`, defaults to 1.0): tau; 1 is the exact posterior.
        mask_threshold (`float`, defaults to 0.02): in [0, 1], relative to the global max of |R|; 0 uses the soft
            (signed) R as the mask. Reference configs: 0.02 (CelebA-HQ, AFHQ), 0.05 (CIFAR-10), 0.005 (MNIST).
        chunk_size (`int`, defaults to 1024): stored images converted to float per step of the streaming softmax
            (bounds the memory; the result does not depend on it).
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr:
            The training noise schedule, as in diffusers' `DDIMScheduler`; the defaults equal `DDIMScheduler()`'s.
        prediction_type (`str`, defaults to `"epsilon"`): what `forward` returns: `"epsilon"`, `"v_prediction"` or
            `"sample"` (x0).
    """

    supports_data_parallel = True

    #: How many noise levels keep their mask in memory (D x D bool each; float32 for the soft mask).
    mask_cache_size = 16

    @register_to_config
    def __init__(
        self,
        sample_size: int | tuple[int, int] = 32,
        in_channels: int = 3,
        num_images: int = 2,
        storage_dtype: str = "uint8",
        has_labels: bool = False,
        temperature: float = 1.0,
        mask_threshold: float = 0.02,
        chunk_size: int = 1024,
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
        check_finite_positive("temperature", float(temperature))
        if not (isinstance(mask_threshold, (int, float)) and 0.0 <= mask_threshold <= 1.0):
            raise ValueError(f"`mask_threshold` must be in [0, 1], got {mask_threshold}.")
        if not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
        if not isinstance(num_images, int) or num_images < 2:
            raise ValueError(
                f"PCA locality needs at least 2 images (the covariance is undefined for fewer), got num_images={num_images}."
            )
        if storage_dtype not in STORAGE_DTYPES:
            raise ValueError(f"`storage_dtype` must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}.")
        channels, height, width = self.sample_shape
        dim = channels * height * width
        self.register_buffer("mean", torch.zeros(dim))  # mu  [D]
        self.register_buffer("eigvecs", torch.zeros(dim, dim))  # U  [D, D]
        self.register_buffer("eigvals", torch.zeros(dim))  # lam [D]
        self._register_image_storage(num_images, storage_dtype, has_labels)  # images [N, C, H, W], labels [N]
        self._mask_cache: OrderedDict = OrderedDict()
        self._mask_lock = CacheLock()  # two threads at a new noise level build its mask once

    @classmethod
    def from_dataset(
        cls,
        images,
        batch_size: int = 256,
        show_progress: bool = True,
        storage_dtype: str = "auto",
        device=None,
        **config,
    ) -> PCALocalityDenoiser:
        r"""
        Stores the images and fits the Wiener statistics: mean and unbiased (N - 1) covariance in float64, its full
        eigendecomposition (eigenvalues clamped at 0; from the N x N Gram matrix when N < D), stored as float32,
        exactly as `WienerDenoiser` does.

        Args:
            images: anything [`~diffusers_analytic.data.iter_image_batches`] reads: a float tensor `[N, C, H, W]` in
                `[-1, 1]`, a uint8 tensor in `[0, 255]`, an `ImageSet`, a `datasets.Dataset`, an iterable of batches.
            batch_size (`int`, defaults to 256): images per streamed batch.
            show_progress (`bool`, defaults to `True`): a tqdm bar while fitting.
            storage_dtype (`str`, defaults to `"auto"`): `"auto"` keeps 8-bit sources as uint8 and float sources as
                float32; or `"uint8"`, `"float16"`, `"float32"`.
            device (`str` or `torch.device`, *optional*): where the float64 moments and the eigendecomposition are
                computed (default: the CPU), as in `WienerDenoiser.from_dataset`; the denoiser is returned on the CPU.
            **config: `temperature`, `mask_threshold`, `chunk_size`, the schedule, `prediction_type`; data-source
                options `image_column`, `label_column`, `resolution`, `channels`, `labels`.
        """
        stored, labels, config = cls._read_images_for_storage(images, batch_size, storage_dtype, config)
        if len(stored) < 2:
            raise ValueError(
                f"PCA locality needs at least 2 images (the covariance is undefined for fewer), got {len(stored)}."
            )
        moments, shape = fit_moments(
            stored, batch_size=batch_size, show_progress=show_progress, keep_rows=True, device=device
        )
        denoiser = cls(**config)
        eigvecs, eigvals, _ = covariance_eigenbasis(moments)
        kept = len(eigvals)  # fewer than D for N < D images (Gram route): the other columns stay 0, eigenvalue 0
        denoiser.mean.copy_(moments.mean)
        denoiser.eigvecs[:, :kept].copy_(eigvecs)
        denoiser.eigvals[:kept].copy_(eigvals)
        denoiser._copy_stored_images(stored, labels)
        logger.info(f"Fitted a PCA-locality denoiser on {len(stored)} images of shape {list(shape)}.")
        return denoiser

    # ------------------------------------------------------------------ the mask of a noise level
    def locality_mask(self, alpha_prod: float, batch_size: int = 8) -> LocalityMask:
        """
        The mask M at noise level `a = alpha_prod` and its tiling, cached (LRU of `mask_cache_size` noise levels).

        W and R are computed in float64 from the stored eigenbasis (see [`~models.pca_mask.pca_locality_mask`]).
        """
        key = (
            float(alpha_prod),
            float(self.config.mask_threshold),
            buffer_key(self.eigvecs),
            buffer_key(self.eigvals),
        )
        with self._mask_lock:
            cached = self._mask_cache.get(key)
            if cached is not None:
                self._mask_cache.move_to_end(key)
                return cached
            eigvecs, eigvals = self.eigvecs, self.eigvals
            if eigvecs.device.type == "mps":  # no float64 there: build the mask on the CPU
                eigvecs, eigvals = eigvecs.cpu(), eigvals.cpu()
            mask = pca_locality_mask(eigvecs, eigvals, float(alpha_prod), float(self.config.mask_threshold))
            mask = mask.to(self.eigvecs.device)
            entry = self._prepare_mask(mask, batch_size)
            self._mask_cache[key] = entry
            while len(self._mask_cache) > self.mask_cache_size:
                self._mask_cache.popitem(last=False)
            return entry

    def _prepare_mask(self, mask: torch.Tensor, batch_size: int = 8, **options) -> LocalityMask:
        """
        A mask `[D, D]` (bool or float) with the evaluation its cost model picks (see
        [`~models.pca_mask.prepare_locality_mask`]; `options`: `paths` and the tiling's options).
        """
        return prepare_locality_mask(mask, self.sample_shape, batch_size=batch_size, **options)

    # ------------------------------------------------------------------ the closed form
    def estimated_flops(self, batch_size: int) -> float:
        """
        At most the dense formulation, one `[B N, D] x [D, D]` GEMM of the per-input terms against the mask (2 B N D^2),
        plus the mask of a new noise level (a symmetric D x D product in float64, about D^3).
        """
        dim = math.prod(self.sample_shape)
        return 2.0 * batch_size * len(self.images) * dim * dim + float(dim) ** 3

    def _denoise(self, x_t, alpha_prod_t, beta_prod_t, generator=None, class_labels=None):
        # Samples that share the noise level (and class) share the mask and one pass over the data.
        batch_size = x_t.shape[0]
        x_flat = x_t.reshape(batch_size, -1)
        x0_hat = torch.empty_like(x_flat)
        groups: dict = {}
        for b in range(batch_size):
            key = (
                float(alpha_prod_t[b]),
                float(beta_prod_t[b]),
                None if class_labels is None else int(class_labels[b]),
            )
            groups.setdefault(key, []).append(b)
        for (alpha_prod, beta_prod, label), members in groups.items():
            index = torch.tensor(members, device=x_t.device)
            x0_hat[index] = self._denoise_group(x_flat[index], alpha_prod, beta_prod, label)
        return x0_hat.reshape(x_t.shape)

    def _denoise_group(self, x_t, alpha_prod, beta_prod, label=None, chunk_size=None, mask=None):
        # Notation: alpha_prod -> a, beta_prod -> 1 - a, temperature -> tau, mean -> mu, images -> y_i (flattened),
        # M the locality mask (column p: the inputs output pixel p sees).
        # Centring by mu changes no distance, (x - sqrt(a) y) = (x - sqrt(a) mu) - sqrt(a) (y - mu), and keeps the
        # float32 sums small.
        batch_size = x_t.shape[0]  # x_t [B, D]
        chunk_size = chunk_size or self.config.chunk_size

        # 1. The mask of this noise level (cached).
        mask = self.locality_mask(alpha_prod, batch_size) if mask is None else mask

        # 2. All-ones mask: d_p(i) = ||x - sqrt(a) y_i||^2 for every p: the optimal denoiser's posterior mean.
        if mask.all_ones:
            a = torch.full((batch_size,), alpha_prod, dtype=torch.float64)
            class_labels = None if label is None else torch.full((batch_size,), label, dtype=torch.int64)
            return posterior_mean(
                x_t,
                a,
                torch.full((batch_size,), beta_prod, dtype=torch.float64),
                self.images,
                self.image_stats(),
                chunk_size,
                float(self.config.temperature),
                labels=self.labels,
                class_labels=class_labels,
                reduce_softmax=lambda state: self._reduce_softmax(state, (batch_size,), (x_t.shape[1],), x_t.device),
            )

        subset = None if label is None else torch.nonzero(self.labels == label, as_tuple=True)[0]
        sqrt_a = math.sqrt(alpha_prod)
        scale = 1.0 / (2.0 * max(beta_prod, MIN_BETA_PROD) * float(self.config.temperature))  # 1 / (2 (1 - a) tau)
        mean = self.mean.to(x_t.device, torch.float32)
        x_c = x_t - sqrt_a * mean  # x - sqrt(a) mu  [B, D]

        # 3. Dense formulation and its sparse products: per piece of n images, the per-input terms
        #    z[b, i, q] = (2 sqrt(a) x[b, q] - a y_i[q]) y_i[q] / (2 (1 - a) tau)
        #    logit[b, i, p] = sum_q z[b, i, q] M[q, p]
        #    (the cross and data terms of the tiles below in one product; sum_q M x^2 cancels in the softmax, and
        #    leaving it out keeps the float32 sums small), streamed through one online softmax per (b, p) with
        #    values y_i[p]. "dense": one GEMM  [B n, D] x [D, D]  for all pixels. "sparse": CSR M^T  [D, D]  times
        #    z^T  [D, B n]. "complement" (nearly full masks): sum_q z[b, i, q] (the full distance's logit, a row sum)
        #    minus CSR (1 - M)^T times z^T.
        if mask.path in ("dense", "sparse", "complement"):
            dim = x_t.shape[1]
            weights = mask.mask.to(torch.float32) if mask.dense else None  # M  [D, D] (rebuilt per call: 4 D^2 bytes)
            softmax = OnlineSoftmax()
            piece = min(chunk_size, max(1, DENSE_PIECE_ROWS // batch_size))
            for _, y in image_chunks(self.images, piece, indices=subset, device=x_t.device):
                y_c = y - mean  # [n, D]
                num = len(y_c)
                if mask.dense:
                    z = (x_c[:, None, :] * (2.0 * sqrt_a * scale) - y_c * (alpha_prod * scale)).mul_(y_c)  # [B, n, D]
                    logits = (z.reshape(-1, dim) @ weights).reshape(batch_size, num, dim).transpose(1, 2)  # [B, D, n]
                else:
                    y_t = y_c.T.contiguous()  # [D, n]
                    z = (x_c.T[:, :, None] * (2.0 * sqrt_a * scale) - y_t[:, None, :] * (alpha_prod * scale)).mul_(
                        y_t[:, None, :]
                    )  # z^T  [D, B, n]
                    logits = (mask.sparse @ z.reshape(dim, -1)).reshape(dim, batch_size, num).permute(1, 0, 2)
                    if mask.path == "complement":
                        logits = logits.neg_().add_(z.sum(0)[:, None, :])  # [B, D, n]
                softmax.update(logits, lambda w, y_c=y_c: w.mul_(y_c.T).sum(-1))
            softmax = self._reduce_softmax(softmax, (batch_size, dim), (), x_t.device)  # data-parallel shards
            return mean + softmax.result()

        # 4. Per tile T of output pixels (inputs K = the union of their supports, see `locality_tiles`):
        #    cross[b, p, i] = sum_q (x[b, q] M[q, p]) y_i[q]        one GEMM  [B P, K] x [K, n]
        #    data[p, i]     = sum_q M[q, p] y_i[q]^2                one GEMM  [P, K] x [K, n]   (shared by the batch)
        #    logit[b, p, i] = (2 sqrt(a) cross - a data) / (2 (1 - a) tau)      (sum_q M x^2 cancels in the softmax)
        #    streamed through an online softmax per (b, p) with values y_i[p]. A complement tile holds -(1 - M):
        #    its logits are added to those of the full distance, (2 sqrt(a) x.y_i - a ||y_i||^2) / (2 (1 - a) tau).
        # The [B P, K] query of a tile is rebuilt per chunk (B P K products against the GEMM's n B P K), so that
        # only one tile's query is in memory at a time.
        needs_full = any(complement for *_, complement in mask.tiles)
        tile_masks = []  # M[q_idx, p_idx]^T, or -(1 - M)^T for a complement tile, float32 [P, K] (rebuilt per call)
        for p_idx, q_idx, complement in mask.tiles:
            columns = mask.mask[:, p_idx] if q_idx is None else mask.mask[q_idx][:, p_idx]  # [K, P]
            if complement:
                columns = -(~columns).to(torch.float32)
            tile_masks.append(columns.T.to(torch.float32).contiguous())
        softmaxes = [OnlineSoftmax() for _ in mask.tiles]
        for _, y in image_chunks(self.images, chunk_size, indices=subset, device=x_t.device):
            y_c = y - mean  # [n, D]
            if needs_full:
                full = (
                    (x_c @ y_c.T).mul_(2.0 * sqrt_a * scale).sub_(y_c.square().sum(1).mul_(alpha_prod * scale))
                )  # [B, n]
            for (p_idx, q_idx, complement), mask_t, softmax in zip(mask.tiles, tile_masks, softmaxes):
                x_q = x_c if q_idx is None else x_c[:, q_idx]  # [B, K]
                query = (x_q[:, None, :] * mask_t[None]).reshape(-1, mask_t.shape[1])  # x[b, q] M[q, p]  [B P, K]
                y_q = y_c if q_idx is None else y_c[:, q_idx]  # [n, K]
                logits = (query @ y_q.T).mul_(2.0 * sqrt_a * scale).reshape(batch_size, len(p_idx), -1)  # [B, P, n]
                logits.sub_((mask_t @ y_q.square().T).mul_(alpha_prod * scale))  # a data / (2 (1 - a) tau)  [P, n]
                if complement:
                    logits.add_(full[:, None, :])
                values = y_c[:, p_idx].T  # y_i[p] - mu[p]  [P, n]
                softmax.update(logits, lambda w, values=values: w.mul_(values).sum(-1))
        shapes = [((batch_size, len(p_idx)), ()) for p_idx, *_ in mask.tiles]
        softmaxes = self._reduce_softmaxes(softmaxes, shapes, x_t.device)  # data-parallel shards
        out = torch.empty_like(x_t)
        for (p_idx, *_), softmax in zip(mask.tiles, softmaxes):
            out[:, p_idx] = softmax.result()
        return mean + out
