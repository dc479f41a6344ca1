"""Patch-size schedules of the LS / ELS patch machines (Kamb & Ganguli, ICML 2025, arXiv 2412.20292).

A trained convolutional denoiser behaves like a patch machine whose patch size k grows with the noise level. A schedule
says which k to use at each noise level, in log-SNR lambda = log(a / (1 - a)), so that it applies to any scheduler and
any number of steps (integer or fractional timesteps alike):

    schedule = [[lambda_0, k_0], [lambda_1, k_1], ..., [lambda_m, k_m]]       lambda_0 > lambda_1 > ... (low noise first)
    k(lambda) = k_j for the first j with lambda >= lambda_j; below every breakpoint, k_m (the noisiest size)

A config may also hold a constant `int` k, or the name of a preset (`PATCH_SIZE_PRESETS`).

The presets are the authors' calibrated sizes for their 20-step cosine schedule, abar(s) = cos^2((s / 1.008) pi / 2),
s = i / 20, step i = 0 (lowest noise) .. 19 (highest). Step i owns the s-interval [(i - 1/2) / 20, (i + 1/2) / 20), so
its breakpoint is lambda_i = log-SNR at s = (i + 1/2) / 20: each step's own noise level falls inside its interval,
and the boundary between two steps lies halfway between them in s. They were calibrated on 32x32 images;
`default_patch_size_schedule` picks one for any image size when `from_dataset` is given none.

`PatchMachineMixin` (end of this file) is the plumbing the LS and ELS denoisers share: stored images, settings chosen
from the data in `from_dataset`, k per sample from the schedule, and a fixed-k entry point for calibration.
"""

from __future__ import annotations

import math

import torch
from diffusers.utils import logging

from .modeling_analytic import check_positive_int
from .stored_images import StoredImagesMixin

logger = logging.get_logger(__name__)

# The authors' 20-step sizes per step i = 0 (lowest noise) .. 19 (highest), arXiv 2412.20292, from the scales files of
# github.com/Kambm/convolutional_diffusion (`files/scales_<data>_<network>_<padding>.pt`), all calibrated on 32x32
# images (MNIST and Fashion-MNIST resized from 28). `*_unet` and `*_resnet` are zero-padded networks (model them
# with the boundary-aware ELS), `*_circular` circular-padding ResNets (ELS with circular padding, valid patches).
_PAPER_PATCH_SIZES = {
    "cifar10_unet": [3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 13, 13, 15, 17, 25],
    "cifar10_resnet": [3, 3, 3, 3, 5, 5, 5, 7, 7, 7, 7, 9, 9, 11, 11, 13, 15, 17, 17, 17],
    "cifar10_resnet_circular": [3, 3, 3, 3, 5, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 13, 13, 15, 15, 15],
    "mnist_unet": [3, 3, 3, 5, 5, 7, 7, 7, 9, 9, 9, 11, 13, 15, 17, 21, 23, 23, 25, 27],
    "mnist_resnet": [3, 3, 5, 5, 5, 7, 7, 7, 9, 9, 11, 11, 11, 11, 13, 15, 15, 15, 15, 15],
    "mnist_resnet_circular": [3, 3, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 11, 9, 9, 7, 7, 3, 3],
    "fashion_mnist_unet": [3, 3, 5, 5, 7, 7, 7, 9, 11, 11, 11, 13, 15, 15, 21, 23, 25, 25, 25, 25],
    "fashion_mnist_resnet": [3, 3, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 13, 13, 15, 15, 15, 17, 17],
    "celeba_unet": [3, 3, 3, 3, 3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 13, 19, 27],
    "celeba_resnet": [3, 3, 3, 5, 5, 5, 5, 5, 7, 7, 9, 9, 9, 11, 11, 11, 13, 15, 19, 19],
}
DEFAULT_PATCH_SIZE_SCHEDULE = "cifar10_unet"
# The image sizes (shorter side, pixels) the presets are taken as calibrated at, and the preset `from_dataset` picks
# for smaller images (see `default_patch_size_schedule`).
CALIBRATED_SIZES = (28, 32)
SMALL_IMAGE_PATCH_SIZE_SCHEDULE = "mnist_unet"
_PAPER_NUM_STEPS = 20
_COSINE_OFFSET = 1.008


def cosine_log_snr(s: float) -> float:
    """log-SNR of the authors' cosine schedule, abar(s) = cos^2((s / 1.008) pi / 2), at s in [0, 1]."""
    angle = (s / _COSINE_OFFSET) * math.pi / 2
    # log(abar / (1 - abar)) = log(cos^2 / sin^2) = 2 log(cot(angle)); +inf at s = 0.
    return math.inf if angle == 0 else 2.0 * math.log(math.cos(angle) / math.sin(angle))


def paper_schedule(patch_sizes: list[int]) -> list[list[float]]:
    """The authors' per-step sizes of their 20-step cosine schedule -> `[[lambda_i, k_i], ...]` log-SNR breakpoints."""
    if len(patch_sizes) != _PAPER_NUM_STEPS:
        raise ValueError(f"The paper's schedule has {_PAPER_NUM_STEPS} steps, got {len(patch_sizes)} sizes.")
    return [[cosine_log_snr((i + 0.5) / _PAPER_NUM_STEPS), int(k)] for i, k in enumerate(patch_sizes)]


PATCH_SIZE_PRESETS = {name: paper_schedule(sizes) for name, sizes in _PAPER_PATCH_SIZES.items()}
PATCH_SIZE_PRESETS["default"] = PATCH_SIZE_PRESETS[DEFAULT_PATCH_SIZE_SCHEDULE]


def _check_patch_size(k) -> int:
    if isinstance(k, bool) or not isinstance(k, (int, float)) or k != int(k) or int(k) < 1 or int(k) % 2 == 0:
        raise ValueError(f"Patch sizes must be odd positive integers, got {k!r}.")
    return int(k)


def resolve_patch_size_schedule(schedule) -> list[tuple[float, int]]:
    """
    A config value (`int`, preset name or list of `[log_snr, k]` pairs) -> validated `[(lambda_j, k_j), ...]`,
    breakpoints strictly decreasing and finite, sizes odd and positive. A ValueError names what is wrong.
    """
    if isinstance(schedule, str):
        if schedule not in PATCH_SIZE_PRESETS:
            raise ValueError(
                f"Unknown patch-size preset {schedule!r}; choose one of {sorted(PATCH_SIZE_PRESETS)} or give a list of "
                "[log_snr, patch_size] pairs."
            )
        schedule = PATCH_SIZE_PRESETS[schedule]
    if isinstance(schedule, (int, float)) and not isinstance(schedule, bool):
        return [(0.0, _check_patch_size(schedule))]
    if not isinstance(schedule, (list, tuple)) or len(schedule) == 0:
        raise ValueError(
            f"`patch_size_schedule` must be an odd int, a preset name or a non-empty list of [log_snr, patch_size] "
            f"pairs, got {schedule!r}."
        )
    pairs = []
    for pair in schedule:
        if not isinstance(pair, (list, tuple)) or len(pair) != 2:
            raise ValueError(f"Each `patch_size_schedule` entry must be a [log_snr, patch_size] pair, got {pair!r}.")
        log_snr = float(pair[0])
        if not math.isfinite(log_snr):
            raise ValueError(f"`patch_size_schedule` breakpoints must be finite log-SNR values, got {pair[0]!r}.")
        pairs.append((log_snr, _check_patch_size(pair[1])))
    breakpoints = [p[0] for p in pairs]
    if any(b <= c for b, c in zip(breakpoints, breakpoints[1:])):
        raise ValueError(
            f"`patch_size_schedule` breakpoints must be strictly decreasing in log-SNR (low noise first), got "
            f"{breakpoints}."
        )
    return pairs


def patch_sizes_at(schedule: list[tuple[float, int]], alpha_prod: torch.Tensor, beta_prod: torch.Tensor) -> list[int]:
    """
    k per sample for a resolved schedule at noise levels a = `alpha_prod`, 1 - a = `beta_prod` (`[B]` tensors):
    lambda = log a - log(1 - a) (+inf at a = 1, -inf at a = 0), then the first breakpoint at or below lambda.
    """
    log_snr = (torch.log(alpha_prod.double()) - torch.log(beta_prod.double())).cpu().tolist()
    sizes = []
    for value in log_snr:
        chosen = schedule[-1][1]
        for breakpoint, k in schedule:
            if value >= breakpoint:
                chosen = k
                break
        sizes.append(chosen)
    return sizes


def scale_patch_size_schedule(schedule, factor: float) -> list[list[float]]:
    """
    A schedule (preset name or `[[log_snr, k], ...]`) with every size multiplied by `factor` and rounded to the
    nearest odd size (ties up, at least 1); the breakpoints do not move.
    """
    return [[log_snr, 2 * math.floor(k * factor / 2) + 1] for log_snr, k in resolve_patch_size_schedule(schedule)]


def default_patch_size_schedule(height: int, width: int) -> tuple[str | list[list[float]], str]:
    """
    The schedule `from_dataset` chooses for `height` x `width` images when none is given, and why (for the log).
    With S = min(height, width):

    - S < 28: `"mnist_unet"`, sizes in pixels (each machine caps them at the image). A patch posterior is as sharp as
      the patch has pixels, so shrinking the sizes with the image leaves 1-3 pixel patches that identify nothing
      (8x8 digits turn to noise); of the presets, mnist_unet reaches whole-image patches soonest, which keeps the
      layout of small images (digits at 8x8, faces at 25x25).
    - 28 <= S <= 32 (the calibration size): `"cifar10_unet"`, the class default.
    - S > 32: cifar10_unet's sizes times S / 32 (a network for larger images has proportionally larger receptive
      fields): breakpoints as a list.
    """
    size = min(height, width)
    if size < CALIBRATED_SIZES[0]:
        why = f"the shorter side {size} px is below the presets' {CALIBRATED_SIZES[0]}-{CALIBRATED_SIZES[1]} px"
        return SMALL_IMAGE_PATCH_SIZE_SCHEDULE, why
    if size <= CALIBRATED_SIZES[1]:
        return DEFAULT_PATCH_SIZE_SCHEDULE, f"{size} px is the presets' calibration size"
    factor = size / CALIBRATED_SIZES[1]
    schedule = scale_patch_size_schedule(DEFAULT_PATCH_SIZE_SCHEDULE, factor)
    sizes = [k for _, k in schedule]
    why = f"{DEFAULT_PATCH_SIZE_SCHEDULE}'s sizes x {factor:.3g} for {size} px (k = {min(sizes)} .. {max(sizes)})"
    return schedule, why


def schedule_from_steps(log_snrs: list[float], patch_sizes: list[int], clip: float = 40.0) -> list[list[float]]:
    """
    A schedule that gives `patch_sizes[s]` at the noise level `log_snrs[s]` of each step s of a reverse process, in any
    order: steps are sorted low noise first and each boundary sits halfway (in log-SNR) between neighbouring steps.
    Infinite log-SNR values (a = 0 or 1) are clipped to +-`clip` first, so every breakpoint is finite.
    """
    if len(log_snrs) != len(patch_sizes) or not log_snrs:
        raise ValueError(
            f"Need one patch size per step, got {len(log_snrs)} noise levels and {len(patch_sizes)} sizes."
        )
    steps = sorted(
        ((max(-clip, min(clip, float(lam))), _check_patch_size(k)) for lam, k in zip(log_snrs, patch_sizes)),
        key=lambda item: -item[0],
    )
    merged: list[tuple[float, int]] = []
    for lam, k in steps:  # repeated noise levels (e.g. Heun's doubled timesteps) keep the first size
        if not merged or lam < merged[-1][0]:
            merged.append((lam, k))
    schedule = []
    for j, (lam, k) in enumerate(merged):
        breakpoint = 0.5 * (lam + merged[j + 1][0]) if j + 1 < len(merged) else lam - 1.0
        schedule.append([breakpoint, k])
    # Neighbouring steps with the same size need no breakpoint between them.
    compact = [schedule[0]]
    for breakpoint, k in schedule[1:]:
        if k == compact[-1][1]:
            compact[-1][0] = breakpoint
        else:
            compact.append([breakpoint, k])
    return compact


class PatchMachineMixin(StoredImagesMixin):
    """
    What the LS and ELS machines share besides the closed form: the stored images (`images` `[N, C, H, W]`, optional
    `labels` `[N]`, named as in the other data-holding denoisers), the patch size k at each noise level, and a
    fixed-k entry point for calibration. A subclass implements `_denoise_patch(x_t, a, 1 - a, k, class_labels)` for
    one k and may cap k in `effective_patch_size`. Use it first among the bases:
    `class LocalScoreDenoiser(PatchMachineMixin, ModelMixin, ConfigMixin)`.
    """

    @classmethod
    def _fit_patch_machine(cls, images, batch_size: int, storage_dtype: str, config: dict, name: str):
        """
        `from_dataset` of a patch machine: reads the images, completes the settings the caller left out from the
        data (`_data_defaults`; written into the config and logged), builds the machine and copies the images in.
        """
        stored, labels, config = cls._read_images_for_storage(images, batch_size, storage_dtype, config)
        chosen, notes = cls._data_defaults(config)
        denoiser = cls(**config, **chosen)
        denoiser._copy_stored_images(stored, labels)
        logger.info(f"Stored {len(stored)} images ({config['storage_dtype']}) in {name}.")
        if notes:
            logger.info(f"Chosen from the data: {'; '.join(notes)}. Pass these keywords to choose others.")
        return denoiser

    @classmethod
    def _data_defaults(cls, config: dict) -> tuple[dict, list[str]]:
        """
        `(settings, notes)`: the settings `from_dataset` chooses from the data for the keywords `config` lacks, and a
        note on each for the log; here the patch-size schedule of the image size (`default_patch_size_schedule`).
        """
        if "patch_size_schedule" in config:
            return {}, []
        size = config["sample_size"]
        height, width = (size, size) if isinstance(size, int) else size
        schedule, why = default_patch_size_schedule(height, width)
        shown = repr(schedule) if isinstance(schedule, str) else "a list"
        return {"patch_size_schedule": schedule}, [f"patch_size_schedule={shown} ({why})"]

    def _init_patch_machine(self) -> None:
        config = self.config
        self._patch_schedule = resolve_patch_size_schedule(config.patch_size_schedule)
        check_positive_int("chunk_size", config.chunk_size)
        self._register_image_storage(config.num_images, config.storage_dtype, config.has_labels)  # y_1 .. y_N
        self._fixed_patch_size: int | None = None

    def set_patch_size_schedule(self, schedule) -> None:
        """Replaces the patch-size schedule (an odd int, a preset name or `[[log_snr, k], ...]`) in the config."""
        resolved = resolve_patch_size_schedule(schedule)
        self.register_to_config(patch_size_schedule=schedule)
        self._patch_schedule = resolved

    def patch_size_at(self, timestep, batch_size: int | None = None) -> list[int]:
        """The patch size k used at `timestep` (int, float or tensor, as in `denoise`), one per sample."""
        alpha_prod, beta_prod = self.alpha_prod_at(timestep, batch_size)
        return [self.effective_patch_size(k) for k in patch_sizes_at(self._patch_schedule, alpha_prod, beta_prod)]

    @torch.no_grad()
    def denoise_with_patch_size(
        self, sample: torch.Tensor, timestep, patch_size: int, class_labels=None
    ) -> torch.Tensor:
        """`denoise` with the schedule replaced by a fixed odd `patch_size` (used by calibration)."""
        self._fixed_patch_size = _check_patch_size(patch_size)
        try:
            return self.denoise(sample, timestep, class_labels=class_labels)
        finally:
            self._fixed_patch_size = None

    def effective_patch_size(self, patch_size: int) -> int:
        """The patch size actually used for a requested (scheduled) one; the machines cap sizes beyond the image."""
        return patch_size

    def largest_patch_size(self) -> int:
        """The largest patch size k this machine uses at any noise level (the fixed one during calibration)."""
        if self._fixed_patch_size is not None:
            return self.effective_patch_size(self._fixed_patch_size)
        return max(self.effective_patch_size(int(k)) for _, k in self._patch_schedule)

    def _denoise(self, x_t, alpha_prod_t, beta_prod_t, generator=None, class_labels=None):
        # k per sample from the schedule at each sample's log-SNR, then one call per distinct k.
        if self._fixed_patch_size is not None:
            sizes = [self.effective_patch_size(self._fixed_patch_size)] * len(x_t)
        else:
            sizes = [
                self.effective_patch_size(k) for k in patch_sizes_at(self._patch_schedule, alpha_prod_t, beta_prod_t)
            ]
        x0_hat = torch.empty_like(x_t)
        for k in sorted(set(sizes)):
            rows = torch.tensor([b for b, size in enumerate(sizes) if size == k], device=x_t.device)
            labels = None if class_labels is None else class_labels[rows.cpu()]
            x0_hat[rows] = self._denoise_patch(x_t[rows], alpha_prod_t[rows], beta_prod_t[rows], k, labels)
        return x0_hat
