"""Building the repo folder of a hub config: its data as a checked stream of batches, the fitted pipeline, a sample
grid and the model card, saved atomically."""

from __future__ import annotations

import inspect
import os
from collections.abc import Iterator

import diffusers
import PIL.Image
import torch
from diffusers.utils import logging
from tqdm.auto import tqdm

from .. import __version__
from ..data import (
    BUILTIN_DATASETS,
    ImageBatch,
    ImageSet,
    is_hf_dataset,
    iter_image_batches,
    load_builtin,
    load_image_dataset,
)
from ..pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline, scheduler_from_denoiser
from ..saving import save_atomically
from ..utils.images import image_grid
from ..utils.seeding import generators_for_indices
from .config import DENOISER_SCHEDULER_KEYS, HubConfig, denoiser_class_for, scheduler_class_and_kwargs
from .model_card import CARD_NAME, SAMPLE_GRID_NAME, BuildInfo, render_model_card

logger = logging.get_logger(__name__)


# ---------------------------------------------------------------------------------------------- data
class ConfiguredImages:
    """
    The images a hub config names, as a re-iterable stream of [`ImageBatch`]es (uint8 `[B, C, H, W]`) with a
    progress bar: every image is checked against `data.resolution` and `data.channels` (a ValueError otherwise), at
    most `data.max_images` are read. `num_images` holds the count of the last complete pass.
    """

    def __init__(self, config: HubConfig, show_progress: bool = True):
        self.config = config
        self.data = config.data
        self.show_progress = show_progress
        self.num_images = 0
        self.source = self._load()

    def _load(self):
        data = self.data
        if data["source"] in BUILTIN_DATASETS:
            if data["resize"]:
                raise ValueError(f"The built-in set {data['source']!r} cannot be resized; set `data.resize: false`.")
            if data["source"] == "patches":
                options = {"num_images": 2000, "seed": 0, **data["options"]}
                return load_builtin("patches", size=data["resolution"], channels=data["channels"], **options)
            return load_builtin(data["source"])
        dataset = load_image_dataset(data["source"], split=data["split"], streaming=data["streaming"])
        features = getattr(dataset, "features", None)
        for key, what in (("image_column", "image"), ("label_column", "label")):
            if data[key] is not None and features is not None and data[key] not in features:
                raise ValueError(
                    f"The data set {data['source']!r} (split {data['split']!r}) has no {what} column {data[key]!r} "
                    f"named by `data.{key}`; its columns are {list(features)}."
                )
        return dataset

    def expected_count(self) -> int | None:
        """The number of images a pass reads, when the source knows its size (not a streamed data set)."""
        if isinstance(self.source, ImageSet) or (is_hf_dataset(self.source) and hasattr(self.source, "__len__")):
            total = len(self.source)
            return total if self.data["max_images"] is None else min(total, self.data["max_images"])
        return self.data["max_images"]

    def __iter__(self) -> Iterator[ImageBatch]:
        data = self.data
        size = (data["resolution"], data["resolution"])
        total = self.expected_count()
        progress = tqdm(
            total=total, desc=f"Reading {self.config.dataset_name}", unit="img", disable=not self.show_progress
        )
        count = 0
        batches = iter_image_batches(
            self.source,
            batch_size=data["batch_size"],
            image_column=data["image_column"],
            label_column=data["label_column"],
            resolution=size if data["resize"] else None,
            channels=data["channels"],
        )
        for batch in batches:
            channels, height, width = batch.images.shape[1:]
            if (height, width) != size:
                hint = " or set `data.resize: true`" if data["source"] not in BUILTIN_DATASETS else ""
                raise ValueError(
                    f"Image {count} of {self.config.dataset_name} is {height}x{width} but the config says "
                    f"`data.resolution: {data['resolution']}`; fix the resolution{hint}."
                )
            if channels != data["channels"]:
                raise ValueError(
                    f"Images of {self.config.dataset_name} have {channels} channels but the config says "
                    f"`data.channels: {data['channels']}`."
                )
            if data["max_images"] is not None and count + len(batch.images) > data["max_images"]:
                keep = data["max_images"] - count
                labels = None if batch.labels is None else batch.labels[:keep]
                batch = ImageBatch(batch.images[:keep], labels)
            count += len(batch.images)
            progress.update(len(batch.images))
            yield batch
            if data["max_images"] is not None and count >= data["max_images"]:
                break
        progress.close()
        self.num_images = count


# ---------------------------------------------------------------------------------------------- build
def fit_pipeline(config: HubConfig, show_progress: bool = True) -> tuple[AnalyticDDIMPipeline, int]:
    """
    Loads the data of `config`, fits its method and returns `(pipeline, number of images)`: an
    [`AnalyticDDIMPipeline`] with the scheduler the config names, built on the denoiser's schedule.
    """
    denoiser_class = denoiser_class_for(config.method)
    scheduler_class, scheduler_kwargs = scheduler_class_and_kwargs(config.scheduler)
    schedule = {k: v for k, v in scheduler_kwargs.items() if k in DENOISER_SCHEDULER_KEYS}
    extra = {k: v for k, v in scheduler_kwargs.items() if k not in DENOISER_SCHEDULER_KEYS}

    images = ConfiguredImages(config, show_progress=show_progress)
    fit_keywords = set(inspect.signature(denoiser_class.from_dataset).parameters)
    fit_options = {}
    if "show_progress" in fit_keywords:
        fit_options["show_progress"] = False  # ConfiguredImages has the bar, with the data set's size
    if "batch_size" in fit_keywords:
        fit_options["batch_size"] = config.data["batch_size"]
    denoiser = denoiser_class.from_dataset(images, **fit_options, **config.params, **schedule)
    scheduler = scheduler_from_denoiser(denoiser, scheduler_class, **extra)
    return AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler), images.num_images


def sample_grid(
    pipeline: AnalyticDDIMPipeline,
    num_images: int = 16,
    num_inference_steps: int = 50,
    seed: int = 0,
    min_size: int = 256,
) -> PIL.Image.Image:
    """
    A grid of `num_images` samples (image i seeded from `(seed, i)`, as `diffusers-analytic generate` does), upscaled
    with nearest-neighbour so that small images stay visible, with a gap between tiles: a PIL image at least
    `min_size` pixels wide ([`~diffusers_analytic.utils.images.image_grid`], as `generate`'s grid.png).
    """
    images = pipeline(
        batch_size=num_images,
        generator=generators_for_indices(seed, range(num_images)),
        num_inference_steps=num_inference_steps,
        output_type="pil",
    ).images
    return image_grid(images, min_width=min_size)


def _versions() -> dict:
    return {"diffusers-analytic": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def build(
    config: HubConfig,
    output_dir: str,
    overwrite: bool = False,
    show_progress: bool = True,
) -> BuildInfo:
    """
    Builds the repo folder of a hub config: fits the method on the config's data, saves the pipeline, a sample grid
    (`samples.png`) and the model card (`README.md`) into `output_dir`. Written into a temporary folder beside
    `output_dir` and renamed at the end: a failed build leaves nothing half-written.
    """
    if os.path.exists(output_dir) and not overwrite:
        raise ValueError(f"{os.path.abspath(output_dir)} exists; pass --overwrite to replace it.")
    pipeline, num_images = fit_pipeline(config, show_progress=show_progress)
    pipeline.set_progress_bar_config(disable=not show_progress, desc="Sample grid")
    grid = sample_grid(pipeline, **config.sample)
    info = BuildInfo(
        num_images=num_images,
        denoiser_class=type(pipeline.unet).__name__,
        sample_config=dict(config.sample),
        scheduler_class=type(pipeline.scheduler).__name__,
        versions=_versions(),
    )
    card = render_model_card(config, info)

    def write_card_and_grid(folder: str) -> None:
        grid.save(os.path.join(folder, SAMPLE_GRID_NAME), format="PNG")
        with open(os.path.join(folder, CARD_NAME), "w", encoding="utf-8") as f:
            f.write(card)

    save_atomically(pipeline, output_dir, overwrite=overwrite, write_extra=write_card_and_grid)
    logger.info(f"Built {config.repo_id} ({config.method} on {num_images} images) in {output_dir}")
    return info
