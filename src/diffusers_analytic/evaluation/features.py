"""Image features from a `transformers` vision encoder (e.g. `facebook/dinov2-base`, the encoder of FD_DINOv2).

[`FeatureEncoder`] loads any `AutoModel` + `AutoImageProcessor` pair (a Hub id or a local folder with `config.json`
and `preprocessor_config.json`) and maps images `[N, C, H, W]` (uint8 `[0, 255]` or float model space `[-1, 1]`)
to one embedding per image: the model's pooled output (DINOv2: the layer-normed CLS token), else the CLS token of
its last hidden state. Grey images are repeated to RGB for encoders that take 3 channels; the processor does the
resizing and normalisation the encoder was trained with.

`transformers` is an optional dependency: `pip install "diffusers-analytic[eval]"`.
"""

from __future__ import annotations

import numpy as np
import torch
from diffusers.utils import logging
from PIL import Image
from tqdm.auto import tqdm

logger = logging.get_logger(__name__)

RECOMMENDED_FEATURE_MODEL = "facebook/dinov2-base"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else ''}".rstrip(": ")


def to_pil_images(images: torch.Tensor, channels: int = 3) -> list[Image.Image]:
    """uint8 `[0, 255]` or model-space float `[N, C, H, W]` -> PIL images (grey repeated to RGB when `channels=3`)."""
    if images.dtype != torch.uint8:
        images = ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    array = images.cpu().permute(0, 2, 3, 1).numpy()  # [N, H, W, C]
    if array.shape[-1] == 1 and channels == 3:
        array = np.repeat(array, 3, axis=-1)
    if array.shape[-1] not in (1, 3):
        raise ValueError(f"Images must have 1 or 3 channels, got {array.shape[-1]}.")
    return [Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image) for image in array]


class FeatureEncoder:
    """
    A `transformers` vision model used as a feature extractor: `encoder(images)` -> float32 `[N, F]` on the CPU.

    Args:
        model: a `transformers` vision model (`PreTrainedModel`) whose output has `pooler_output` or
            `last_hidden_state`.
        processor: its image processor (`AutoImageProcessor`).
        name (`str`): the Hub id or folder it was loaded from (recorded in `metrics.json`).
        device: where the model runs.
        batch_size (`int`): images per forward pass.
        show_progress (`bool`): a tqdm bar over the batches.
    """

    def __init__(self, model, processor, name: str, device="cpu", batch_size: int = 64, show_progress: bool = True):
        if batch_size < 1:
            raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
        self.model = model.eval().to(device)
        self.processor = processor
        self.name = name
        self.device = torch.device(device)
        self.batch_size = batch_size
        self.show_progress = show_progress
        self.num_channels = getattr(model.config, "num_channels", 3)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        device: torch.device | str | None = None,
        batch_size: int = 64,
        show_progress: bool = True,
        **kwargs,
    ) -> FeatureEncoder:
        """
        Loads `AutoModel` and `AutoImageProcessor` from a Hub id (e.g. `"facebook/dinov2-base"`) or a local folder.
        `kwargs` (`revision`, `cache_dir`, `local_files_only`, ...) go to both `from_pretrained` calls. Raises a
        one-line ValueError when transformers is missing or the model cannot be loaded.
        """
        try:
            from transformers import AutoImageProcessor, AutoModel  # optional: the `eval` extra
        except ImportError as error:
            raise ValueError(
                f"A feature model needs transformers ({_first_line(error)}); install it with "
                "`pip install 'diffusers-analytic[eval]'`."
            ) from error
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        try:
            processor = AutoImageProcessor.from_pretrained(name_or_path, **kwargs)
            model = AutoModel.from_pretrained(name_or_path, **kwargs)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as error:
            raise ValueError(
                f"Could not load the feature model {name_or_path!r} with transformers ({_first_line(error)}); pass a "
                f"Hub model id such as {RECOMMENDED_FEATURE_MODEL} (downloaded once, then cached) or a local folder "
                "with config.json, the weights and preprocessor_config.json."
            ) from error
        logger.info(f"Loaded the feature model {name_or_path} ({type(model).__name__}) on {device}.")
        return cls(model, processor, str(name_or_path), device, batch_size, show_progress)

    @torch.inference_mode()
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images (`torch.Tensor`): `[N, C, H, W]`, uint8 `[0, 255]` or float model space `[-1, 1]`.

        Returns:
            `torch.Tensor`: float32 `[N, F]` on the CPU, one embedding per image.
        """
        if not isinstance(images, torch.Tensor) or images.ndim != 4:
            shape = list(images.shape) if hasattr(images, "shape") else type(images).__name__
            raise ValueError(f"`images` must be a tensor [N, C, H, W], got {shape}.")
        features = []
        starts = range(0, len(images), self.batch_size)
        for start in tqdm(starts, desc=f"Features ({self.name})", unit="batch", disable=not self.show_progress):
            batch = to_pil_images(images[start : start + self.batch_size], self.num_channels)
            inputs = self.processor(images=batch, return_tensors="pt")
            pixel_values = inputs["pixel_values"].to(self.device, next(self.model.parameters()).dtype)
            features.append(self._embed(self.model(pixel_values=pixel_values)).float().cpu())
        return torch.cat(features)

    def _embed(self, output) -> torch.Tensor:
        pooled = getattr(output, "pooler_output", None)
        if pooled is not None:
            return pooled.reshape(len(pooled), -1)
        hidden = getattr(output, "last_hidden_state", None)
        if hidden is None:
            raise ValueError(
                f"The feature model {self.name!r} ({type(self.model).__name__}) returns neither `pooler_output` nor "
                "`last_hidden_state`; use a vision backbone such as facebook/dinov2-base."
            )
        return hidden[:, 0] if hidden.ndim == 3 else hidden.reshape(len(hidden), -1)
