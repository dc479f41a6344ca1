"""Image data in, batches out.

Everything `from_dataset` accepts goes through [`iter_image_batches`]:

- a float tensor `[N, C, H, W]` in model space `[-1, 1]` (values further outside than rounding are refused with the
  fix; `value_range=None` accepts any finite values, e.g. Gaussian test data),
- a uint8 tensor or array `[N, C, H, W]` in `[0, 255]` (kept 8-bit: exact and 4x smaller to store); channels-last
  batches `[N, H, W, C]` with C in {1, 3, 4} (numpy / PIL layout) are transposed, with a log line,
- an [`ImageSet`] (the built-in sets return one),
- a `datasets.Dataset` / `datasets.IterableDataset` with an image column (detected, or named by `image_column`),
- any iterable of batches: tensors, `(images, labels)` pairs or dicts with `"images"` / `"labels"`.

Three offline sets ship with scikit-learn / scikit-image and need no download: `digits` (1797 x 1x8x8, labels 0-9),
`faces` (200 x 1x25x25 LFW crops; label 1 = face, 0 = non-face) and `patches` (random crops of the colour photos in
scikit-image and scikit-learn: a natural-image patch set of any size and count).
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from diffusers.utils import logging
from huggingface_hub.utils import HFValidationError, validate_repo_id
from PIL import Image

from .names import BUILTIN_DATASETS

logger = logging.get_logger(__name__)

# `from_dataset` keywords that describe the data source rather than the denoiser (passed to `iter_image_batches`).
DATA_SOURCE_KEYWORDS = ("image_column", "label_column", "resolution", "channels", "labels", "value_range")
# Model space: float images are expected here (up to `_RANGE_SLACK` of the range's width for rounding).
MODEL_SPACE_RANGE = (-1.0, 1.0)
_RANGE_SLACK = 0.005
# Channel counts of the common image layouts (grey, RGB, RGBA): a batch with one of them last and not first is
# channels-last.
_LAYOUT_CHANNELS = (1, 3, 4)
_IMAGE_COLUMN_NAMES = ("image", "img", "images", "pixel_values", "picture")
_LABEL_COLUMN_NAMES = ("label", "labels", "class", "fine_label")


@dataclass
class ImageSet:
    """
    Images held in memory.

    Args:
        images (`torch.Tensor`): uint8 `[N, C, H, W]` in `[0, 255]`, or float `[N, C, H, W]` in model space.
        labels (`torch.Tensor`, *optional*): int64 `[N]` class labels.
        name (`str`): where the images came from, for model cards and logs.
    """

    images: torch.Tensor
    labels: torch.Tensor | None = None
    name: str = "images"

    def __len__(self) -> int:
        return len(self.images)


@dataclass
class ImageBatch:
    """One batch: `images` uint8 `[B, C, H, W]` (8-bit source) or float32 in model space; `labels` int64 `[B]`."""

    images: torch.Tensor
    labels: torch.Tensor | None = None


def to_model_space(images: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """uint8 `[0, 255]` -> `[-1, 1]`; float tensors are only cast."""
    if images.dtype == torch.uint8:
        return images.to(dtype) / 127.5 - 1.0
    return images.to(dtype)


# ---------------------------------------------------------------------------------------------- built-in sets
def load_digits() -> ImageSet:
    """scikit-learn's handwritten digits: 1797 grey 8x8 images (values 0..16 scaled to 0..255), labels 0-9."""
    from sklearn.datasets import load_digits as sklearn_digits

    digits = sklearn_digits()
    images = np.rint(digits.images * (255.0 / 16.0)).astype(np.uint8)[:, None]
    return ImageSet(torch.from_numpy(images), torch.from_numpy(digits.target.astype(np.int64)), "digits")


def load_faces() -> ImageSet:
    """scikit-image's `lfw_subset`: 200 grey 25x25 crops, the first 100 faces (label 1), then 100 non-faces (0)."""
    from skimage import data

    faces = data.lfw_subset()
    images = np.rint(np.clip(faces, 0.0, 1.0) * 255.0).astype(np.uint8)[:, None]
    labels = np.concatenate([np.ones(100, np.int64), np.zeros(len(images) - 100, np.int64)])
    return ImageSet(torch.from_numpy(images), torch.from_numpy(labels), "faces")


def _colour_photos() -> list[np.ndarray]:
    """The natural colour photographs shipped inside scikit-image and scikit-learn (uint8 `[H, W, 3]`)."""
    from skimage import data
    from sklearn.datasets import load_sample_images

    names = ("astronaut", "chelsea", "coffee", "rocket", "hubble_deep_field", "immunohistochemistry", "retina")
    photos = [np.asarray(getattr(data, name)())[..., :3] for name in names]
    photos += [np.asarray(image)[..., :3] for image in load_sample_images().images]
    return photos


def load_patches(size: int = 32, num_images: int = 2000, seed: int = 0, channels: int = 3) -> ImageSet:
    """
    Random `size x size` crops of natural colour photographs: real image statistics at any dimension
    (32x32x3 has CIFAR-10's). Each photo is also used at half resolution so crops cover more scales.
    Labels are the index of the photo a crop came from.

    Args:
        size (`int`): crop side in pixels.
        num_images (`int`): how many crops.
        seed (`int`): crops are a deterministic function of `(size, num_images, seed)`.
        channels (`int`): 3 for RGB, 1 for greyscale (ITU-R 601 luma, as PIL's `"L"` mode).
    """
    if size < 1 or num_images < 1:
        raise ValueError(f"`size` and `num_images` must be positive, got size={size}, num_images={num_images}.")
    if channels not in (1, 3):
        raise ValueError(f"`channels` must be 1 or 3, got {channels}.")
    sources = []
    for photo in _colour_photos():
        pil = Image.fromarray(photo)
        half = pil.resize((pil.width // 2, pil.height // 2), Image.Resampling.BICUBIC)
        for image in (pil, half):
            image = image.convert("L" if channels == 1 else "RGB")
            array = np.asarray(image)
            if min(array.shape[:2]) >= size:
                sources.append(array if array.ndim == 3 else array[..., None])
    if not sources:
        raise ValueError(f"No built-in photo is large enough for {size}x{size} crops.")
    rng = np.random.default_rng(seed)
    which = rng.integers(len(sources), size=num_images)
    out = np.empty((num_images, size, size, channels), np.uint8)
    for n, k in enumerate(which):
        height, width = sources[k].shape[:2]
        top, left = rng.integers(height - size + 1), rng.integers(width - size + 1)
        out[n] = sources[k][top : top + size, left : left + size]
    images = torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()
    return ImageSet(images, torch.from_numpy(which.astype(np.int64)), f"patches{size}")


def load_builtin(name: str, **kwargs) -> ImageSet:
    """Loads a built-in offline set by name: `digits`, `faces` or `patches` (kwargs go to [`load_patches`])."""
    loaders = {"digits": load_digits, "faces": load_faces, "patches": load_patches}
    if name not in loaders:
        raise ValueError(f"Unknown built-in data set {name!r}; choose one of {BUILTIN_DATASETS}.")
    if kwargs and name != "patches":
        raise ValueError(f"The built-in set {name!r} takes no options, got {sorted(kwargs)}.")
    return loaders[name](**kwargs)


def load_image_dataset(source: str, split: str = "train", streaming: bool = False, **kwargs):
    """
    Loads an image data set through `datasets`: a built-in name returns an [`ImageSet`], a local folder of images
    is read with the `imagefolder` builder (sub-folders become labels), anything else is a Hub id.
    """
    if source in BUILTIN_DATASETS:
        return load_builtin(source, **kwargs)
    check_data_source(source)
    import datasets

    if os.path.isdir(source):
        has_script_or_data = any(
            name.endswith((".parquet", ".arrow", ".csv", ".json", ".jsonl"))
            for _, _, files in os.walk(source)
            for name in files
        )
        if not has_script_or_data:
            return datasets.load_dataset("imagefolder", data_dir=source, split=split, streaming=streaming, **kwargs)
    return datasets.load_dataset(source, split=split, streaming=streaming, **kwargs)


def _looks_local(source: str) -> bool:
    """A path rather than a Hub id: absolute, `./`-relative, `~`, more than one `/`, not a valid repo id, or its first
    component is a folder here (`data/mnist` beside a `data/` folder)."""
    if os.path.isabs(source) or source.startswith((".", "~")) or "\\" in source or source.count("/") > 1:
        return True
    try:
        validate_repo_id(source)
    except HFValidationError:
        return True
    return "/" in source and os.path.isdir(source.split("/")[0])


def check_data_source(source: str) -> None:
    """
    Refuses at once, before any Hub request, a source that is neither a built-in set nor an existing path but looks
    like a typo of a built-in name (`digitz`) or like a local path (`./data/mnist`, `data/mnist` beside `data/`):
    a ValueError naming the built-in sets, or a FileNotFoundError naming the missing path. Hub ids pass.
    """
    if source in BUILTIN_DATASETS or os.path.exists(source):
        return
    close = difflib.get_close_matches(source.lower(), BUILTIN_DATASETS, n=1, cutoff=0.75)
    if close:
        raise ValueError(
            f"Unknown data set {source!r}: did you mean the built-in {close[0]!r}? The built-in sets are "
            f"{', '.join(BUILTIN_DATASETS)}; anything else must be a local image folder or a Hub data set id."
        )
    if _looks_local(source):
        raise FileNotFoundError(
            f"No such local folder {os.path.abspath(os.path.expanduser(source))!r} (from {source!r}); check the path, "
            f"or name a built-in set ({', '.join(BUILTIN_DATASETS)}) or a Hub data set id (org/name)."
        )


# ---------------------------------------------------------------------------------------------- conversion
def pil_to_array(image: Image.Image, resolution: tuple[int, int] | None, channels: int) -> np.ndarray:
    """A PIL image -> uint8 `[C, H, W]`: converted to grey/RGB, shorter side resized, then center-cropped."""
    image = image.convert("L" if channels == 1 else "RGB")
    if resolution is not None:
        height, width = resolution
        scale = max(height / image.height, width / image.width)
        if (image.height, image.width) != (height, width):
            new_size = (max(width, round(image.width * scale)), max(height, round(image.height * scale)))
            image = image.resize(new_size, Image.Resampling.BICUBIC)
            left, top = (image.width - width) // 2, (image.height - height) // 2
            image = image.crop((left, top, left + width, top + height))
    array = np.asarray(image, dtype=np.uint8)
    return array[None] if array.ndim == 2 else array.transpose(2, 0, 1)


def _find_column(features, names, wanted_type: str | None, what: str, given: str | None) -> str | None:
    columns = list(features)
    if given is not None:
        if given not in columns:
            raise ValueError(f"The data set has no {what} column {given!r}; its columns are {columns}.")
        return given
    if wanted_type is not None:
        for column, feature in features.items():
            if type(feature).__name__ == wanted_type:
                return column
    for name in names:
        if name in columns:
            return name
    return None


def _as_tensor_images(images, resolution, channels) -> torch.Tensor:
    """A list of PIL images / arrays, or an array/tensor batch -> uint8 or float tensor `[B, C, H, W]`."""
    if isinstance(images, torch.Tensor):
        return images
    if isinstance(images, np.ndarray):
        return torch.from_numpy(images)
    if isinstance(images, list) and images and isinstance(images[0], Image.Image):
        return torch.from_numpy(np.stack([pil_to_array(im, resolution, channels) for im in images]))
    array = np.asarray(images)
    if array.ndim == 3:  # [B, H, W] grey
        array = array[:, None]
    elif is_channels_last(array.shape):
        array = array.transpose(0, 3, 1, 2)  # channels-last -> channels-first (as PIL / numpy store images)
    return torch.from_numpy(np.ascontiguousarray(array))


def _iter_hf_dataset(dataset, batch_size, image_column, label_column, resolution, channels) -> Iterator[ImageBatch]:
    features = dataset.features
    if features is None:  # streaming data set without resolved features
        first = next(iter(dataset))
        columns = {name: type(value).__name__ for name, value in first.items()}
        features = {name: None for name in columns}
    image_column = _find_column(features, _IMAGE_COLUMN_NAMES, "Image", "image", image_column)
    if image_column is None:
        raise ValueError(f"Could not find an image column among {list(features)}; name it with `image_column=`.")
    label_column = _find_column(features, _LABEL_COLUMN_NAMES, "ClassLabel", "label", label_column)
    if channels is None:
        channels = 3
        feature = features.get(image_column) if hasattr(features, "get") else None
        if feature is not None and type(feature).__name__ == "Image" and getattr(feature, "mode", None) == "L":
            channels = 1
    for rows in dataset.iter(batch_size=batch_size):
        images = _as_tensor_images(rows[image_column], resolution, channels)
        labels = None
        if label_column is not None:
            labels = torch.as_tensor(np.asarray(rows[label_column], dtype=np.int64))
        yield ImageBatch(images, labels)


def iter_image_batches(
    data,
    batch_size: int = 256,
    labels: torch.Tensor | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    resolution: int | tuple[int, int] | None = None,
    channels: int | None = None,
    value_range: tuple[float, float] | None = MODEL_SPACE_RANGE,
) -> Iterator[ImageBatch]:
    """
    Yields [`ImageBatch`]es `[B, C, H, W]` from any supported source (see the module docstring), checking each: 4-d,
    finite, uint8 or floating, float values inside `value_range`. A channels-last batch `[B, H, W, C]` (C in 1, 3, 4
    last and not first: numpy / PIL layout) is transposed, and a log line says so. Raises a ValueError naming the
    problem and the fix otherwise, and for a source without any image.

    Args:
        data: the source.
        batch_size (`int`): images per batch for sources that are not already batched.
        labels (`torch.Tensor`, *optional*): labels for tensor sources (`[N]`).
        image_column, label_column (`str`, *optional*): column names of a `datasets` source (detected if omitted).
        resolution (`int` or `(H, W)`, *optional*): resize + center-crop PIL images of a `datasets` source.
        channels (`int`, *optional*): 1 (grey) or 3 (RGB) for PIL images of a `datasets` source.
        value_range (`(float, float)` or `None`, defaults to `(-1, 1)`): where float images must lie (model space);
            values further out than rounding are a ValueError with the fix. `None` accepts any finite values, for data
            that really lives elsewhere (e.g. Gaussian test data; a DDIM scheduler then needs `clip_sample=False`).
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be positive, got {batch_size}.")
    if isinstance(resolution, int):
        resolution = (resolution, resolution)
    if isinstance(data, ImageSet):
        labels = data.labels if labels is None else labels
        data = data.images
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)

    if value_range is not None and (len(value_range) != 2 or not value_range[0] < value_range[1]):
        raise ValueError(f"`value_range` must be a (low, high) pair with low < high, or None; got {value_range!r}.")
    count = 0
    transposed = False
    for batch in _raw_batches(data, batch_size, labels, image_column, label_column, resolution, channels):
        images = batch.images
        if images.ndim != 4:
            raise ValueError(f"Images must be a [N, C, H, W] batch, got shape {list(images.shape)}.")
        if images.dtype != torch.uint8 and not images.is_floating_point():
            raise ValueError(f"Images must be uint8 in [0, 255] or floating in [-1, 1], got dtype {images.dtype}.")
        if is_channels_last(images.shape):
            if not transposed:
                logger.info(
                    f"Images of shape {list(images.shape)} are channels-last [N, H, W, C]; transposed to "
                    f"[N, C, H, W] = {[images.shape[0], images.shape[3], images.shape[1], images.shape[2]]}."
                )
                transposed = True
            images = images.permute(0, 3, 1, 2).contiguous()
            batch = ImageBatch(images, batch.labels)
        if images.is_floating_point():
            _check_float_values(images, value_range)
        if batch.labels is not None and len(batch.labels) != len(images):
            raise ValueError(f"Got {len(batch.labels)} labels for {len(images)} images.")
        count += len(images)
        if len(images):
            yield batch
    if count == 0:
        raise ValueError("The data is empty: no images to fit on.")


def is_channels_last(shape) -> bool:
    """True for a batch shape `[N, H, W, C]` with C in (1, 3, 4) last and not first (numpy / PIL layout)."""
    return len(shape) == 4 and shape[3] in _LAYOUT_CHANNELS and shape[1] not in _LAYOUT_CHANNELS


def _check_float_values(images: torch.Tensor, value_range: tuple[float, float] | None) -> None:
    if not torch.isfinite(images).all():
        raise ValueError("The data contains NaN or infinite values.")
    if value_range is None or images.numel() == 0:
        return
    low, high = (float(v) for v in value_range)
    slack = _RANGE_SLACK * (high - low)
    found_low, found_high = (float(v) for v in torch.aminmax(images.detach().float()))
    if found_low < low - slack or found_high > high + slack:
        raise ValueError(
            f"Float images must lie in [{low:g}, {high:g}] (model space) but this data spans [{found_low:.4g}, "
            f"{found_high:.4g}]; divide 8-bit values by 127.5 and subtract 1 (or pass them as uint8), or pass "
            "`value_range=None` for data that really lives elsewhere."
        )


def _raw_batches(data, batch_size, labels, image_column, label_column, resolution, channels):
    if isinstance(data, torch.Tensor):
        if labels is not None:
            labels = torch.as_tensor(labels).reshape(-1).long()
            if len(labels) != len(data):
                raise ValueError(f"Got {len(labels)} labels for {len(data)} images.")
        for start in range(0, len(data), batch_size):
            stop = start + batch_size
            yield ImageBatch(data[start:stop], None if labels is None else labels[start:stop])
        return
    if is_hf_dataset(data):
        yield from _iter_hf_dataset(data, batch_size, image_column, label_column, resolution, channels)
        return
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ValueError(
            f"Cannot read images from a {type(data).__name__}; pass a tensor, an ImageSet, a datasets.Dataset or an "
            "iterable of batches (load a data set by name with `load_image_dataset`)."
        )
    for item in data:
        if isinstance(item, ImageBatch):
            yield item
        elif isinstance(item, dict):
            key = image_column or next((k for k in _IMAGE_COLUMN_NAMES if k in item), None)
            if key is None:
                raise ValueError(f"A batch dict has no image key among {list(item)}; name it with `image_column=`.")
            label_key = label_column or next((k for k in _LABEL_COLUMN_NAMES if k in item), None)
            label_values = None if label_key is None else torch.as_tensor(np.asarray(item[label_key])).long()
            yield ImageBatch(_as_tensor_images(item[key], resolution, channels or 3), label_values)
        elif isinstance(item, (tuple, list)) and len(item) == 2:
            yield ImageBatch(_as_tensor_images(item[0], resolution, channels or 3), torch.as_tensor(item[1]).long())
        else:
            yield ImageBatch(_as_tensor_images(item, resolution, channels or 3))


def is_hf_dataset(data) -> bool:
    """True for a `datasets.Dataset` or `datasets.IterableDataset` (without importing `datasets`)."""
    module = type(data).__module__
    return module.startswith("datasets.") and hasattr(data, "iter") and hasattr(data, "features")


@dataclass
class DataShard:
    """
    This process's shard of a data source, for distributed fitting: fitting functions that stream moments
    ([`~diffusers_analytic.kernels.moments.fit_moments`], hence `WienerDenoiser.from_dataset`) read `data` and all-reduce
    the sums, so every process ends with the statistics of the whole data set. Make one with [`~diffusers_analytic.distributed.shard_data`].

    Args:
        data: the shard itself (a tensor slice, an `ImageSet` slice, a `datasets` shard or an iterable of batches).
        index (`int`), num_shards (`int`): which shard of how many.
        communicator: how the sums are combined (a `distributed.ProcessGroupCommunicator` in a real run; see `kernels.reductions.Communicator`).
    """

    data: Any
    index: int
    num_shards: int
    communicator: Any = field(default=None, repr=False)
