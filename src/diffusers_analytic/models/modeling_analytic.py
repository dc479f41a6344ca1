"""The part every analytic denoiser shares: the training noise schedule, ``a(t)`` for integer and fractional
timesteps, input checks, and the conversion of ``x0_hat`` into the prediction a diffusers scheduler asks for.

Notation (docs/math.md), VP diffusion with the DDPM schedule of the config::

    x_t = sqrt(a_t) * x_0 + sqrt(1 - a_t) * eps,     a_t = alphas_cumprod[t]   (alpha_prod_t -> a, beta_prod_t -> 1 - a)

A denoiser implements one method, ``_denoise(x_t, alpha_prod_t, beta_prod_t, generator, class_labels) -> x0_hat``,
with ``x_t`` a float32 ``[B, C, H, W]`` tensor and the two schedule tensors float64 ``[B]``. Everything else lives here.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass

import torch
from diffusers.models.unets.unet_2d import UNet2DOutput
from diffusers.utils import logging

from .. import __version__
from ..kernels import schedule
from ..kernels.cost import LONG_RUN_FLOPS, time_at_stated_rates
from ..kernels.schedule import MIN_BETA_PROD, alphas_cumprod_from_schedule

logger = logging.get_logger(__name__)

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")
# `from_pretrained` keywords that say where config.json is (read first, to check the saved class).
_CONFIG_LOCATION_KEYWORDS = (
    "cache_dir",
    "force_download",
    "proxies",
    "token",
    "local_files_only",
    "revision",
    "subfolder",
)


@dataclass
class AnalyticDenoiserOutput(UNet2DOutput):
    """
    Output of an analytic denoiser's `forward`.

    Args:
        sample (`torch.Tensor` of shape `(batch_size, num_channels, height, width)`):
            The prediction the config's `prediction_type` asks for (epsilon, v or x0), as a trained UNet returns it.
        pred_original_sample (`torch.Tensor` of the same shape):
            The denoiser's estimate of the clean image, x0_hat, in model space.
    """

    pred_original_sample: torch.Tensor | None = None


class AnalyticDenoiserMixin:
    r"""
    Mixin for analytic denoisers; use it before `ModelMixin` and `ConfigMixin`:
    `class WienerDenoiser(AnalyticDenoiserMixin, ModelMixin, ConfigMixin)`.

    The subclass's `__init__` is decorated with `@register_to_config` and takes the schedule arguments
    (`num_train_timesteps`, `beta_start`, `beta_end`, `beta_schedule`, `trained_betas`, `rescale_betas_zero_snr`),
    `sample_size`, `in_channels` and `prediction_type`, then calls `self._init_analytic()`.
    """

    # ------------------------------------------------------------------ set-up
    def _init_analytic(self) -> None:
        # Saved folders record the package version that wrote them (diffusers ignores `_` keys when loading).
        self.register_to_config(_diffusers_analytic_version=__version__)
        config = self.config
        if config.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {config.prediction_type!r}.")
        if int(config.in_channels) < 1:
            raise ValueError(f"`in_channels` must be a positive integer, got {config.in_channels}.")
        height, width = self.image_size
        if height < 1 or width < 1:
            raise ValueError(f"`sample_size` must be positive, got {config.sample_size}.")
        # A plain attribute, not a buffer: `model.to(torch.float16)` must not round the schedule.
        self._alphas_cumprod = alphas_cumprod_from_schedule(
            num_train_timesteps=config.num_train_timesteps,
            beta_start=config.beta_start,
            beta_end=config.beta_end,
            beta_schedule=config.beta_schedule,
            trained_betas=config.trained_betas,
            rescale_betas_zero_snr=config.rescale_betas_zero_snr,
        )

    @property
    def image_size(self) -> tuple[int, int]:
        """`(height, width)` of the images this denoiser works on."""
        size = self.config.sample_size
        if isinstance(size, int):
            return (size, size)
        return (int(size[0]), int(size[1]))

    @property
    def sample_shape(self) -> tuple[int, int, int]:
        """`(channels, height, width)` of one sample."""
        return (int(self.config.in_channels), *self.image_size)

    @property
    def alphas_cumprod(self) -> torch.Tensor:
        """The training schedule's cumulative alphas, float64 `[num_train_timesteps]` on the CPU."""
        return self._alphas_cumprod

    @classmethod
    def _config_for_data(cls, shape: tuple[int, int, int], config: dict) -> dict:
        """
        `config` completed with `in_channels` / `sample_size` of the data (`shape` = `(C, H, W)`); a value given
        that contradicts the data, or a keyword `__init__` does not take, is a ValueError.
        """
        accepted = set(inspect.signature(cls.__init__).parameters) - {"self"}
        unknown = sorted(set(config) - accepted)
        if unknown:
            raise ValueError(f"{cls.__name__} got unknown config keywords {unknown}; it accepts {sorted(accepted)}.")
        channels, height, width = shape
        sample_size = height if height == width else [height, width]
        given_channels = config.get("in_channels", channels)
        given_size = config.get("sample_size", sample_size)
        if isinstance(given_size, int):
            given_size = [given_size, given_size]
        if given_channels != channels or list(given_size) != [height, width]:
            raise ValueError(
                f"The data has images of shape {list(shape)} but the config asks for in_channels={given_channels}, "
                f"sample_size={config.get('sample_size')}."
            )
        return {**config, "in_channels": channels, "sample_size": sample_size}

    # ------------------------------------------------------------------ the schedule at any t
    def alpha_prod_at(self, timestep: int | float | torch.Tensor, batch_size: int | None = None):
        """
        `(a, 1 - a)` at `timestep`, each float64 `[B]` on the CPU.

        Integer timesteps read `alphas_cumprod` directly. Fractional ones (Karras, exponential or beta sigmas of
        Euler-type schedulers) interpolate log sigma, sigma = sqrt((1 - a) / a), linearly between the neighbouring
        integer steps, as diffusers' `_sigma_to_t` does, and return a = 1 / (1 + sigma^2) and 1 - a through a
        sigmoid so that neither loses precision near 0 or 1.

        Args:
            timestep (`int`, `float` or `torch.Tensor`):
                A number, a 0-d tensor or a `[B]` tensor (any integer or floating dtype) in
                `[0, num_train_timesteps - 1]`.
            batch_size (`int`, *optional*):
                Broadcast a single timestep to this many entries; a `[B]` tensor must have this length.
        """
        fast = self._integer_alpha_prod(timestep, batch_size)
        if fast is not None:
            return fast
        t = self._timestep_tensor(timestep, batch_size)
        num_train_timesteps = len(self._alphas_cumprod)
        t_low = t.floor().long().clamp(max=num_train_timesteps - 1)
        t_high = (t_low + 1).clamp(max=num_train_timesteps - 1)
        frac = t - t_low.to(torch.float64)

        alpha_low = self._alphas_cumprod[t_low]
        log_sigma_low = schedule.log_sigma(alpha_low)
        log_sigma_high = schedule.log_sigma(self._alphas_cumprod[t_high])
        # frac > 0 only; where frac == 0 the integer value is used as is (and inf - inf never happens).
        log_sigma = log_sigma_low + frac * (log_sigma_high - log_sigma_low)
        is_integer = frac == 0
        alpha_prod = torch.where(is_integer, alpha_low, torch.sigmoid(-2.0 * log_sigma))
        beta_prod = torch.where(is_integer, 1.0 - alpha_low, torch.sigmoid(2.0 * log_sigma))
        return alpha_prod, beta_prod

    def _integer_alpha_prod(self, timestep, batch_size: int | None):
        """
        `(a, 1 - a)` read from the table when `timestep` is an in-range integer (a number, an integral float, or an
        integer tensor of the right length); None for anything else, which the general path handles (and rejects
        with its messages). The values equal the general path's: `alphas_cumprod[t]` and `1 - alphas_cumprod[t]`.
        """
        alphas, alpha_list, beta_list, betas = self._schedule_tables()
        last = len(alpha_list) - 1
        if isinstance(timestep, torch.Tensor):
            if timestep.dtype == torch.bool or timestep.is_complex():
                return None
            if timestep.ndim == 0:
                timestep = timestep.item()
            elif (
                timestep.ndim == 1
                and not timestep.is_floating_point()
                and timestep.numel() > 0
                and batch_size in (None, timestep.numel())
            ):
                index = timestep.detach().to("cpu", torch.int64)
                low, high = torch.aminmax(index)
                if low.item() < 0 or high.item() > last:
                    return None
                return alphas[index], betas[index]
            else:
                return None
        if isinstance(timestep, float) and timestep.is_integer():
            timestep = int(timestep)
        if not isinstance(timestep, int) or isinstance(timestep, bool) or not 0 <= timestep <= last:
            return None
        size = 1 if batch_size is None else batch_size
        alpha = torch.full((size,), alpha_list[timestep], dtype=torch.float64)
        return alpha, torch.full((size,), beta_list[timestep], dtype=torch.float64)

    def _schedule_tables(self):
        """`alphas_cumprod` and `1 - alphas_cumprod` as float64 tensors and Python lists, built once per schedule."""
        tables = self.__dict__.get("_schedule_table_cache")
        if tables is None or tables[0] is not self._alphas_cumprod:
            alphas = self._alphas_cumprod
            betas = 1.0 - alphas
            tables = (alphas, alphas.tolist(), betas.tolist(), betas)
            self.__dict__["_schedule_table_cache"] = tables  # one tuple, replaced whole: safe when threads race
        return tables

    def _timestep_tensor(self, timestep, batch_size: int | None) -> torch.Tensor:
        num_train_timesteps = len(self._alphas_cumprod)
        if isinstance(timestep, torch.Tensor):
            if timestep.ndim > 1:
                raise ValueError(
                    f"`timestep` must be a number, a 0-d or a 1-d tensor, got shape {tuple(timestep.shape)}."
                )
            if timestep.is_complex() or timestep.dtype == torch.bool:
                raise ValueError(f"`timestep` must be an integer or floating tensor, got dtype {timestep.dtype}.")
            t = timestep.detach().to("cpu", torch.float64).reshape(-1)
        elif isinstance(timestep, (int, float)) and not isinstance(timestep, bool):
            t = torch.tensor([float(timestep)], dtype=torch.float64)
        else:
            raise ValueError(f"`timestep` must be an int, a float or a tensor, got {type(timestep).__name__}.")
        if batch_size is not None:
            if t.numel() == 1:
                t = t.expand(batch_size)
            elif t.numel() != batch_size:
                raise ValueError(f"`timestep` has {t.numel()} entries for a batch of {batch_size} samples.")
        if not torch.isfinite(t).all():
            raise ValueError(f"`timestep` must be finite, got {t.tolist()}.")
        if (t < 0).any() or (t > num_train_timesteps - 1).any():
            bad = t[(t < 0) | (t > num_train_timesteps - 1)]
            raise ValueError(
                f"`timestep` must lie in [0, {num_train_timesteps - 1}] (the training schedule's range), got "
                f"{bad.tolist()}."
            )
        return t

    # ------------------------------------------------------------------ checks
    def _check_sample(self, sample: torch.Tensor) -> None:
        if not isinstance(sample, torch.Tensor):
            raise ValueError(f"`sample` must be a torch.Tensor, got {type(sample).__name__}.")
        expected = self.sample_shape
        if sample.ndim != 4 or tuple(sample.shape[1:]) != expected:
            raise ValueError(
                f"`sample` must have shape [batch, {expected[0]}, {expected[1]}, {expected[2]}] (in_channels, "
                f"sample_size of the config), got {list(sample.shape)}."
            )
        if not sample.is_floating_point():
            raise ValueError(f"`sample` must be a floating tensor, got dtype {sample.dtype}.")
        if sample.shape[0] == 0:
            raise ValueError("`sample` holds no image (batch size 0); pass at least one.")
        if sample.device.type == "cpu":
            low, high = torch.aminmax(sample)  # NaN propagates into both; +-inf shows in one (one pass, no mask)
            finite = math.isfinite(low.item()) and math.isfinite(high.item())
        else:
            finite = bool(torch.isfinite(sample).all())
        if not finite:
            raise ValueError("`sample` contains NaN or infinite values.")

    def _check_class_labels(self, class_labels, batch_size: int) -> torch.Tensor | None:
        """Class labels as int64 `[B]` on the CPU, or None. Only denoisers that stored labels accept them."""
        if class_labels is None:
            return None
        known = self._known_labels()
        if known is None:
            raise ValueError(
                f"`class_labels` were given but this {type(self).__name__} was fitted without labels; refit it with "
                "`labels=` (or a data set with a label column) to generate class-conditionally."
            )
        labels = torch.as_tensor(class_labels).reshape(-1).to("cpu", torch.int64)
        if labels.numel() == 1:
            labels = labels.expand(batch_size)
        if labels.numel() != batch_size:
            raise ValueError(f"`class_labels` has {labels.numel()} entries for a batch of {batch_size} samples.")
        unknown = sorted(set(labels.tolist()) - set(known.tolist()))
        if unknown:
            raise ValueError(f"Unknown class labels {unknown}; the stored labels are {sorted(known.tolist())}.")
        return labels

    def _known_labels(self) -> torch.Tensor | None:
        """The distinct class labels this denoiser can condition on; None when it stores no labels."""
        labels = getattr(self, "labels", None)
        return None if labels is None else torch.unique(labels.cpu())

    # ------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        r"""
        diffusers' `ModelMixin.from_pretrained`, refusing what would give a denoiser with uninitialised statistics: a
        folder whose `config.json` names another class (a ValueError naming the saved class and the loader to use),
        or weights that lack a buffer this class needs (a ValueError naming them). Takes diffusers' keywords.
        """
        location = {key: kwargs[key] for key in _CONFIG_LOCATION_KEYWORDS if kwargs.get(key) is not None}
        saved_class = cls.load_config(pretrained_model_name_or_path, **location).get("_class_name")
        if saved_class is not None and saved_class != cls.__name__:
            raise ValueError(
                f"{pretrained_model_name_or_path} was saved by {saved_class} (the `_class_name` of its config.json), "
                f"not {cls.__name__}; load it with `{saved_class}.from_pretrained`, or a whole pipeline folder with "
                "`AnalyticDDIMPipeline.from_pretrained`."
            )
        wants_info = kwargs.pop("output_loading_info", False)
        loaded = super().from_pretrained(pretrained_model_name_or_path, output_loading_info=True, **kwargs)
        model, info = loaded if isinstance(loaded, tuple) else (loaded, {})
        if info.get("missing_keys"):
            raise ValueError(
                f"The weights in {pretrained_model_name_or_path} lack {sorted(info['missing_keys'])}, which "
                f"{cls.__name__} needs; the folder is incomplete or was saved by another class: save the fitted "
                "denoiser again with `save_pretrained`."
            )
        return (model, info) if wants_info else model

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def denoise(
        self,
        sample: torch.Tensor,
        timestep: int | float | torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        class_labels: torch.Tensor | list[int] | None = None,
        guidance_scale: float | None = None,
    ) -> torch.Tensor:
        r"""
        The denoiser's estimate of the clean image, x0_hat = E[x_0 | x_t].

        Args:
            sample (`torch.Tensor` of shape `(B, C, H, W)`):
                The noisy sample x_t in model space.
            timestep (`int`, `float` or `torch.Tensor`):
                Training timestep(s) in `[0, num_train_timesteps - 1]`; fractional values are interpolated in
                log sigma. A 0-d tensor or number applies to the whole batch, a `[B]` tensor per sample.
            generator (`torch.Generator` or a list of `B` of them, *optional*):
                Randomness for methods that draw noise; a list gives each sample its own stream.
            class_labels (`torch.Tensor` or `list[int]`, *optional*):
                One label per sample, for denoisers fitted with labels: restricts the posterior to that class.
            guidance_scale (`float`, *optional*):
                Classifier-free guidance w with `class_labels`: x0_hat = x0_all + w (x0_class - x0_all), where x0_all
                is the unconditional posterior mean (all stored images) and x0_class the class-conditional one. The
                same combination of the epsilon predictions, eps_all + w (eps_class - eps_all), since eps is affine in
                x0_hat at a fixed x_t. `None` or 1 is the class-conditional result, 0 the unconditional one. Methods
                that draw noise use the same draws for both terms.

        Returns:
            `torch.Tensor`: x0_hat, same shape, dtype and device as `sample`.
        """
        return self._predict(sample, timestep, generator, class_labels, guidance_scale=guidance_scale)[0]

    @torch.no_grad()
    def forward(
        self,
        sample: torch.Tensor,
        timestep: int | float | torch.Tensor,
        generator: torch.Generator | list[torch.Generator] | None = None,
        return_dict: bool = True,
        class_labels: torch.Tensor | list[int] | None = None,
        guidance_scale: float | None = None,
    ) -> AnalyticDenoiserOutput | tuple:
        r"""
        Drop-in replacement for a UNet's forward: returns the prediction of the config's `prediction_type`.

        eps_hat = (x_t - sqrt(a) x0_hat) / sqrt(1 - a),  v_hat = (sqrt(a) x_t - x0_hat) / sqrt(1 - a)
        (the same as sqrt(a) eps_hat - sqrt(1 - a) x0_hat),  or x0_hat itself for `"sample"`.

        Args:
            sample, timestep, generator, class_labels: as in [`~AnalyticDenoiserMixin.denoise`].
            return_dict (`bool`, *optional*, defaults to `True`):
                Return an [`AnalyticDenoiserOutput`] (a `UNet2DOutput` with `pred_original_sample`) or a tuple.
        """
        x0_hat, x_t, alpha_prod, beta_prod = self._predict(
            sample, timestep, generator, class_labels, keep=True, guidance_scale=guidance_scale
        )
        prediction = self.prediction_from_x0(x0_hat, x_t, alpha_prod, beta_prod).to(sample.dtype)
        x0_hat = x0_hat.to(sample.dtype)
        if not return_dict:
            return (prediction,)
        return AnalyticDenoiserOutput(sample=prediction, pred_original_sample=x0_hat)

    def prediction_from_x0(
        self,
        x0_hat: torch.Tensor,
        x_t: torch.Tensor,
        alpha_prod: torch.Tensor,
        beta_prod: torch.Tensor,
        prediction_type: str | None = None,
    ) -> torch.Tensor:
        """
        Converts x0_hat into `prediction_type` (defaults to the config's); `alpha_prod`, `beta_prod` are `[B]` tensors.
        The pipeline passes a scheduler's prediction type here when it differs from the config's.
        """
        prediction_type = prediction_type or self.config.prediction_type
        if prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"`prediction_type` must be one of {PREDICTION_TYPES}, got {prediction_type!r}.")
        if prediction_type == "sample":
            return x0_hat
        sqrt_alpha = _per_sample(alpha_prod.sqrt(), x_t)
        sqrt_beta = _per_sample(beta_prod.clamp(min=MIN_BETA_PROD).sqrt(), x_t)
        if prediction_type == "epsilon":
            return torch.addcmul(x_t, sqrt_alpha, x0_hat, value=-1.0).div_(sqrt_beta)
        return torch.sub(sqrt_alpha * x_t, x0_hat).div_(sqrt_beta)  # v_prediction

    def _predict(self, sample, timestep, generator, class_labels, keep: bool = False, guidance_scale=None):
        self._check_sample(sample)
        batch_size = sample.shape[0]
        alpha_prod, beta_prod = self.alpha_prod_at(timestep, batch_size)
        labels = self._check_class_labels(class_labels, batch_size)
        guidance_scale = _check_guidance_scale(guidance_scale, labels)
        if isinstance(generator, list) and len(generator) != batch_size:
            raise ValueError(f"Got {len(generator)} generators for a batch of {batch_size} samples.")
        self._warn_if_long_call(batch_size, guidance_scale)
        x_t = sample if sample.dtype == torch.float32 else sample.to(torch.float32)
        if x_t.device.type != "cpu":  # the schedule is float64 on the CPU already
            schedule_dtype = torch.float32 if x_t.device.type == "mps" else torch.float64
            alpha_prod = alpha_prod.to(x_t.device, schedule_dtype)
            beta_prod = beta_prod.to(x_t.device, schedule_dtype)
        if guidance_scale is None or guidance_scale == 1.0:  # (w = 1: the class-conditional result itself)
            x0_hat = self._denoise(x_t, alpha_prod, beta_prod, generator=generator, class_labels=labels)
        elif guidance_scale == 0.0:  # (w = 0: the unconditional result itself)
            x0_hat = self._denoise(x_t, alpha_prod, beta_prod, generator=generator, class_labels=None)
        else:
            x0_all, x0_class = self._denoise_guided(x_t, alpha_prod, beta_prod, generator, labels)
            x0_hat = x0_all + guidance_scale * (x0_class - x0_all)
        if keep:
            return x0_hat, x_t, alpha_prod, beta_prod
        return (x0_hat if x0_hat.dtype == sample.dtype else x0_hat.to(sample.dtype),)

    #: The share of the float32 GEMM rate that the method's arithmetic reaches: 1 for closed forms made of GEMMs; the
    #: long-run warnings divide their time estimates by it.
    gemm_rate_fraction = 1.0

    def estimated_flops(self, batch_size: int) -> float | None:
        """
        An upper estimate of the floating-point operations of one `denoise` call on `batch_size` samples (2 per
        multiply-add of its GEMMs), so that a long run can say so before it starts; None when a method gives none.
        """
        return None

    def _warn_if_long_call(self, batch_size: int, guidance_scale) -> None:
        """A warning with the estimated time before a single call above `kernels.cost.LONG_RUN_FLOPS`."""
        flops = self.estimated_flops(batch_size)
        if flops is None:
            return
        if guidance_scale not in (None, 0.0, 1.0):
            flops *= 2  # the unconditional and the class-conditional term
        if flops / self.gemm_rate_fraction < LONG_RUN_FLOPS:
            return
        logger.warning(
            f"One {type(self).__name__} call on {batch_size} samples needs about {flops / 1e12:.3g} TFLOP: "
            f"{time_at_stated_rates(flops, self.gemm_rate_fraction)}. A smaller batch or fewer stored images make it "
            "shorter."
        )

    def _denoise(self, x_t, alpha_prod_t, beta_prod_t, generator=None, class_labels=None) -> torch.Tensor:
        """The closed form: x0_hat for float32 `x_t` `[B, C, H, W]`, float64 `alpha_prod_t`, `beta_prod_t` `[B]`."""
        raise NotImplementedError

    def _denoise_guided(self, x_t, alpha_prod_t, beta_prod_t, generator, class_labels):
        """
        `(x0_all, x0_class)` for classifier-free guidance: two calls of `_denoise`, the second replaying the first's
        random draws (the generators' states are restored in between, so they end where one call leaves them).
        Denoisers whose posterior allows it override this with one pass over their data.
        """
        if generator is None:  # one stream for both calls, seeded from torch's default generator (as a draw would be)
            generator = torch.Generator(x_t.device).manual_seed(int(torch.randint(2**62, ())))
        generators = generator if isinstance(generator, list) else [generator]
        states = [g.get_state() for g in generators]
        x0_class = self._denoise(x_t, alpha_prod_t, beta_prod_t, generator=generator, class_labels=class_labels)
        for g, state in zip(generators, states):
            g.set_state(state)
        x0_all = self._denoise(x_t, alpha_prod_t, beta_prod_t, generator=generator, class_labels=None)
        return x0_all, x0_class


def _check_guidance_scale(guidance_scale, class_labels) -> float | None:
    """`guidance_scale` as a float (or None); a ValueError without class labels or for a non-finite value."""
    if guidance_scale is None:
        return None
    if isinstance(guidance_scale, bool) or not isinstance(guidance_scale, (int, float)):
        raise ValueError(f"`guidance_scale` must be a number, got {type(guidance_scale).__name__}.")
    if not math.isfinite(guidance_scale):
        raise ValueError(f"`guidance_scale` must be finite, got {guidance_scale}.")
    if class_labels is None:
        raise ValueError(
            "`guidance_scale` needs `class_labels`: guidance moves the class-conditional prediction away from the "
            "unconditional one; pass the class of each sample."
        )
    return float(guidance_scale)


def _per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A `[B]` tensor reshaped to broadcast over `like` `[B, ...]`, in `like`'s dtype."""
    return values.to(like.dtype).reshape(-1, *([1] * (like.ndim - 1)))


def check_finite_positive(name: str, value: float, allow_zero: bool = False) -> None:
    """Raises a ValueError naming `name` unless `value` is finite and > 0 (or >= 0)."""
    ok = math.isfinite(value) and (value >= 0 if allow_zero else value > 0)
    if not ok:
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"`{name}` must be a finite number {bound}, got {value}.")


def check_positive_int(name: str, value) -> None:
    """Raises a ValueError naming `name` unless `value` is an integer >= 1."""
    if int(value) < 1:
        raise ValueError(f"`{name}` must be a positive integer, got {value}.")
