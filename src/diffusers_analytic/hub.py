"""The Hub layer: `hub_configs/*.yaml` (schema and validation), building a pipeline folder with a model card, the
package version stored in saved folders, and pushing a folder to the Hub with `huggingface_hub`.

A hub config describes one publishable repo (see `hub_configs/` at the top of the repository):

```yaml
repo_id: diffusers-analytic/wiener-cifar10
method: wiener                     # one of HUB_METHODS
params: {}                         # the method's config keywords, passed to `from_dataset`
data:
  name: CIFAR-10                   # shown in the model card (defaults to `source`)
  source: uoft-cs/cifar10          # a Hub data set id, a local image folder, or a built-in set (digits, faces, patches)
  split: train
  image_column: img                # detected if omitted
  resolution: 32                   # every image must have this size ...
  channels: 3                      # ... and this many channels (1 = grey, 3 = RGB)
  resize: false                    # true: resize the shorter side + center-crop to `resolution`
scheduler:
  class_name: DDIMScheduler        # the scheduler saved with the pipeline
  beta_schedule: linear            # schedule keys go to the denoiser and the scheduler, others to the scheduler
license: unknown
paper: {title: ..., authors: ..., year: ..., url: ..., bibtex: ...}
```
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import PIL.Image
import torch
import yaml
from diffusers import DiffusionPipeline
from diffusers.utils import logging
from huggingface_hub import create_branch, create_repo, hf_hub_download, upload_folder
from tqdm.auto import tqdm

from . import __version__
from .data import BUILTIN_DATASETS, ImageBatch, ImageSet, is_hf_dataset, iter_image_batches, load_builtin

logger = logging.get_logger(__name__)

# The methods a hub config may name (DESIGN.md section 2). A method can be known here before its class is registered
# in `registry.DENOISERS`; building such a config then fails with a clear error.
HUB_METHODS = ("wiener", "optimal", "scfdm", "pca_locality", "nearest_dataset")

# Config keywords of each method (DESIGN.md section 4), used to check `params` when the class is not registered.
METHOD_PARAMS = {
    "wiener": ("rank",),
    "optimal": ("temperature", "num_neighbors", "chunk_size"),
    "scfdm": ("temperature", "num_neighbors", "num_noise", "smoothing_std", "chunk_size"),
    "pca_locality": ("temperature", "mask_threshold", "chunk_size"),
    "nearest_dataset": ("chunk_size",),
}

# What the model card says about each method.
METHOD_CARD_TEXT = {
    "wiener": (
        "Wiener filter (Gaussian posterior mean)",
        "The exact posterior mean E[x_0 | x_t] when the data are modelled as a Gaussian N(mu, S) fitted to the "
        "training set: `x0_hat = mu + U diag(sqrt(a) lam / (a lam + 1 - a)) U^T (x_t - sqrt(a) mu)`. Sampling with "
        "it reproduces N(mu, S).",
        "the mean and the eigendecomposition of the unbiased (N - 1) covariance of the training images",
    ),
    "optimal": (
        "Optimal (empirical Bayes) denoiser",
        "The posterior mean of x_0 under the empirical distribution of the training set: a softmax over all "
        "training images of `-||x_t - sqrt(a) y_i||^2 / (2 (1 - a) tau)`, computed exactly with a streaming softmax. "
        "Sampling with it memorizes: every sample lands on a training image.",
        "the training images themselves (8-bit sources are stored as uint8)",
    ),
    "scfdm": (
        "Smoothed closed-form diffusion model (SCFDM)",
        "The optimal denoiser's estimate averaged over `num_noise` Gaussian perturbations `x_t + smoothing_std * z` "
        "of its input, which lets samples leave the training set.",
        "the training images themselves (8-bit sources are stored as uint8)",
    ),
    "pca_locality": (
        "PCA-locality denoiser",
        "Per-pixel posterior means with locality masks derived from the Wiener filter of the data: each output pixel "
        "weights the training images by the distance it sees through its thresholded mask.",
        "the training images and the eigendecomposition of their covariance",
    ),
    "nearest_dataset": (
        "Nearest-training-image denoiser",
        "Returns the training image closest to `x_t / sqrt(a)` (the tau -> 0 limit of the optimal denoiser): a "
        "memorization baseline.",
        "the training images themselves (8-bit sources are stored as uint8)",
    ),
}

# Keys of a scheduler config that are the training noise schedule: they go to the denoiser too.
SCHEDULE_KEYS = (
    "num_train_timesteps",
    "beta_start",
    "beta_end",
    "beta_schedule",
    "trained_betas",
    "rescale_betas_zero_snr",
    "prediction_type",
)

# The key under which saved folders record the package version (model_index.json and the denoiser's config.json).
# diffusers ignores config keys that start with "_" when it builds a class from a config, without a warning.
VERSION_KEY = "_diffusers_analytic_version"

DEFAULT_ORG = "diffusers-analytic"
SAMPLE_GRID_NAME = "samples.png"
CARD_NAME = "README.md"


# ---------------------------------------------------------------------------------------------- schema
_REQUIRED = object()


@dataclass(frozen=True)
class _Field:
    types: tuple
    default: Any = _REQUIRED
    section: dict | None = None  # nested schema of a mapping


def _section(schema: dict, default: Any = _REQUIRED) -> _Field:
    return _Field((dict,), default, schema)


_PAPER_SCHEMA = {
    "title": _Field((str,)),
    "authors": _Field((str,)),
    "year": _Field((int,)),
    "url": _Field((str,)),
    "bibtex": _Field((str,)),
}
_DATA_SCHEMA = {
    "source": _Field((str,)),
    "name": _Field((str, type(None)), None),
    "split": _Field((str,), "train"),
    "image_column": _Field((str, type(None)), None),
    "label_column": _Field((str, type(None)), None),
    "resolution": _Field((int,)),
    "channels": _Field((int,)),
    "resize": _Field((bool,), False),
    "streaming": _Field((bool,), False),
    "max_images": _Field((int, type(None)), None),
    "batch_size": _Field((int,), 256),
    "options": _Field((dict,), {}),
}
_SAMPLE_SCHEMA = {
    "num_images": _Field((int,), 16),
    "num_inference_steps": _Field((int,), 50),
    "seed": _Field((int,), 0),
}
HUB_CONFIG_SCHEMA = {
    "repo_id": _Field((str,)),
    "method": _Field((str,)),
    "params": _Field((dict,), {}),
    "data": _section(_DATA_SCHEMA),
    "scheduler": _Field((dict,), {}),  # `class_name` + that class's config keys, checked against its signature
    "license": _Field((str,)),
    "license_name": _Field((str, type(None)), None),
    "license_link": _Field((str, type(None)), None),
    "paper": _section(_PAPER_SCHEMA),
    "references": _Field((list,), []),
    "tags": _Field((list,), []),
    "description": _Field((str, type(None)), None),
    "sample": _section(_SAMPLE_SCHEMA, {}),
}


_TYPE_NAMES = {
    dict: "a mapping",
    list: "a list",
    str: "a string",
    int: "an integer",
    bool: "true or false",
    type(None): "null",
}


def _type_names(types: tuple) -> str:
    return " or ".join(_TYPE_NAMES.get(t, t.__name__) for t in types)


def _check_section(values: Any, schema: dict, where: str, prefix: str = "") -> dict:
    """`values` completed with defaults; unknown keys, missing fields and wrong types are ValueErrors."""
    if not isinstance(values, dict):
        raise ValueError(
            f"{where}: `{prefix.rstrip('.') or 'the config'}` must be a mapping, got {type(values).__name__}."
        )
    unknown = sorted(set(values) - set(schema))
    if unknown:
        raise ValueError(
            f"{where}: unknown key{'s' if len(unknown) > 1 else ''} {', '.join(f'`{prefix}{k}`' for k in unknown)}; "
            f"allowed keys are {sorted(schema)}."
        )
    out = {}
    for key, spec in schema.items():
        name = f"{prefix}{key}"
        if key not in values:
            if spec.default is _REQUIRED:
                raise ValueError(f"{where}: missing required field `{name}`.")
            value = spec.default.copy() if isinstance(spec.default, (dict, list)) else spec.default
        else:
            value = values[key]
            # bool is an int in Python; a YAML `true` is not a resolution.
            wrong_bool = isinstance(value, bool) and bool not in spec.types
            if wrong_bool or not isinstance(value, spec.types):
                raise ValueError(f"{where}: `{name}` must be {_type_names(spec.types)}, got {value!r}.")
        if spec.section is not None:
            value = _check_section(value, spec.section, where, f"{name}.")
        out[key] = value
    return out


@dataclass
class HubConfig:
    """A validated hub config (see the module docstring); `path` is the YAML file it came from, if any."""

    repo_id: str
    method: str
    params: dict
    data: dict
    scheduler: dict
    license: str
    license_name: str | None
    license_link: str | None
    paper: dict
    references: list
    tags: list
    description: str | None
    sample: dict
    path: str | None = field(default=None, compare=False)

    @property
    def dataset_name(self) -> str:
        return self.data["name"] or self.data["source"]

    @property
    def hub_dataset_id(self) -> str | None:
        """The data set's Hub id, or None for built-in sets and local folders."""
        source = self.data["source"]
        if source in BUILTIN_DATASETS or os.path.isdir(source) or not is_repo_id(source):
            return None
        return source


def is_repo_id(name: str) -> bool:
    """True for a string shaped like a Hub repo id (`"name"` or `"org/name"`)."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_repo_id(repo_id: str, what: str = "repo id") -> str:
    """`repo_id` if it is a valid `org/name` Hub repo id, else a ValueError."""
    if repo_id.count("/") != 1 or not is_repo_id(repo_id):
        raise ValueError(f"The {what} must look like `org/name` (letters, digits, '-', '_', '.'), got {repo_id!r}.")
    return repo_id


def default_repo_id(method: str, dataset: str, org: str = DEFAULT_ORG) -> str:
    """The naming scheme of the published repos: `("pca_locality", "CIFAR-10")` -> `"diffusers-analytic/pca-locality-cifar-10"`."""
    slug = lambda text: re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")  # noqa: E731
    return check_repo_id(f"{org}/{slug(method)}-{slug(dataset)}")


def validate_hub_config(raw: Any, where: str = "hub config") -> HubConfig:
    """
    Checks a parsed hub config against the schema and returns it completed with defaults.

    Raises a ValueError naming the file (`where`) and the key for unknown keys, missing fields, wrong types, an unknown
    method, method parameters the method does not take, an unknown scheduler or scheduler key, a bad repo id.
    """
    values = _check_section(raw, HUB_CONFIG_SCHEMA, where)
    method = values["method"]
    if method not in HUB_METHODS:
        raise ValueError(f"{where}: unknown method {method!r}; choose one of {list(HUB_METHODS)}.")
    _check_method_params(method, values["params"], where)
    try:
        check_repo_id(values["repo_id"], "`repo_id`")
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    data = values["data"]
    if data["channels"] not in (1, 3):
        raise ValueError(f"{where}: `data.channels` must be 1 or 3, got {data['channels']}.")
    for key in ("resolution", "batch_size"):
        if data[key] < 1:
            raise ValueError(f"{where}: `data.{key}` must be positive, got {data[key]}.")
    if data["max_images"] is not None and data["max_images"] < 1:
        raise ValueError(f"{where}: `data.max_images` must be positive or null, got {data['max_images']}.")
    if data["options"]:
        if data["source"] != "patches":
            raise ValueError(f"{where}: `data.options` is only for the built-in `patches` set, got {data['options']}.")
        unknown = sorted(set(data["options"]) - {"num_images", "seed"})
        if unknown:
            raise ValueError(
                f"{where}: unknown `data.options` {unknown}; the `patches` set takes num_images and seed."
            )
    _check_scheduler(values["scheduler"], where)
    if values["license"] == "other" and not (values["license_name"] and values["license_link"]):
        raise ValueError(f"{where}: `license: other` needs `license_name` and `license_link`.")
    for i, reference in enumerate(values["references"]):
        values["references"][i] = _check_section(
            reference, {"title": _Field((str,)), "url": _Field((str,))}, where, f"references[{i}]."
        )
    if not all(isinstance(tag, str) for tag in values["tags"]):
        raise ValueError(f"{where}: `tags` must be a list of strings, got {values['tags']}.")
    sample = values["sample"]
    if sample["num_images"] < 1 or sample["num_inference_steps"] < 1:
        raise ValueError(
            f"{where}: `sample.num_images` and `sample.num_inference_steps` must be positive, got {sample}."
        )
    return HubConfig(**values)


def _check_method_params(method: str, params: dict, where: str) -> None:
    from .registry import DENOISERS

    if method in DENOISERS:
        accepted = set(inspect.signature(DENOISERS[method].__init__).parameters) - {
            "self",
            "sample_size",
            "in_channels",
        }
        accepted -= set(SCHEDULE_KEYS)
    else:
        accepted = set(METHOD_PARAMS[method])
    unknown = sorted(set(params) - accepted)
    if unknown:
        raise ValueError(f"{where}: method {method!r} takes no parameter {unknown}; it accepts {sorted(accepted)}.")


def _scheduler_class_and_kwargs(scheduler: dict):
    """`(scheduler class, its config keys of the hub config)`; a ValueError for an unknown class or key."""
    import diffusers

    class_name = scheduler.get("class_name", "DDIMScheduler")
    scheduler_class = getattr(diffusers, str(class_name), None)
    if scheduler_class is None or not str(class_name).endswith("Scheduler"):
        raise ValueError(f"Unknown scheduler class_name {class_name!r}; use a diffusers scheduler class name.")
    kwargs = {k: v for k, v in scheduler.items() if k != "class_name"}
    accepted = set(inspect.signature(scheduler_class.__init__).parameters) - {"self"}
    unknown = sorted(set(kwargs) - accepted)
    if unknown:
        raise ValueError(f"{scheduler_class.__name__} takes no config key {unknown}.")
    if "num_train_timesteps" not in accepted:
        raise ValueError(f"{scheduler_class.__name__} is not a DDPM-type scheduler (no `num_train_timesteps`).")
    return scheduler_class, kwargs


def _check_scheduler(scheduler: dict, where: str) -> None:
    try:
        _scheduler_class_and_kwargs(scheduler)
    except ValueError as error:
        raise ValueError(f"{where}: `scheduler`: {error}") from None


def load_hub_config(path: str | os.PathLike) -> HubConfig:
    """Reads and validates a hub config YAML file (see [`validate_hub_config`])."""
    path = os.fspath(path)
    with open(path) as f:
        try:
            raw = yaml.safe_load(f)
        except yaml.YAMLError as error:
            raise ValueError(f"{path} is not valid YAML: {error}") from None
    config = validate_hub_config(raw, where=path)
    config.path = path
    return config


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
        from .data import load_image_dataset

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
@dataclass
class BuildInfo:
    """What a build did, for the model card."""

    num_images: int
    denoiser_class: str
    sample_config: dict
    scheduler_class: str
    versions: dict


def denoiser_class_for(method: str):
    """The registered class of a hub method; a ValueError naming the installed version if it is not available."""
    from .registry import DENOISERS

    if method not in HUB_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {list(HUB_METHODS)}.")
    if method not in DENOISERS:
        raise ValueError(
            f"The method {method!r} is not available in this installation of diffusers-analytic {__version__} "
            f"(registered: {sorted(DENOISERS)})."
        )
    return DENOISERS[method]


def fit_pipeline(config: HubConfig, show_progress: bool = True) -> tuple[DiffusionPipeline, int]:
    """
    Loads the data of `config`, fits its method and returns `(pipeline, number of images)`: an
    [`AnalyticDDIMPipeline`] with the scheduler the config names, built on the denoiser's schedule.
    """
    from .pipelines.pipeline_analytic_ddim import AnalyticDDIMPipeline, scheduler_from_denoiser

    denoiser_class = denoiser_class_for(config.method)
    scheduler_class, scheduler_kwargs = _scheduler_class_and_kwargs(config.scheduler)
    schedule = {k: v for k, v in scheduler_kwargs.items() if k in SCHEDULE_KEYS}
    extra = {k: v for k, v in scheduler_kwargs.items() if k not in SCHEDULE_KEYS}

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
    pipeline: DiffusionPipeline,
    num_images: int = 16,
    num_inference_steps: int = 50,
    seed: int = 0,
    min_size: int = 256,
) -> PIL.Image.Image:
    """
    A grid of `num_images` samples (image i seeded from `(seed, i)`, as `diffusers-analytic generate` does), upscaled
    with nearest-neighbour so that small images stay visible: a PIL image at least `min_size` pixels wide.
    """
    from diffusers.utils import make_image_grid
    from PIL import Image

    from .utils.seeding import generators_for_indices

    images = pipeline(
        batch_size=num_images,
        generator=generators_for_indices(seed, range(num_images)),
        num_inference_steps=num_inference_steps,
        output_type="pil",
    ).images
    cols = math.ceil(math.sqrt(num_images))
    rows = math.ceil(num_images / cols)
    images += [Image.new(images[0].mode, images[0].size)] * (rows * cols - num_images)
    grid = make_image_grid(images, rows=rows, cols=cols)
    scale = max(1, math.ceil(min_size / grid.width))
    return grid.resize((grid.width * scale, grid.height * scale), Image.Resampling.NEAREST)


def _versions() -> dict:
    import diffusers

    return {"diffusers-analytic": __version__, "diffusers": diffusers.__version__, "torch": torch.__version__}


def render_model_card(config: HubConfig, info: BuildInfo) -> str:
    """The model card (README.md with YAML metadata) of a built pipeline folder."""
    from huggingface_hub import ModelCardData

    title, summary, stores = METHOD_CARD_TEXT[config.method]
    data = config.data
    tags = ["diffusers", "diffusers-analytic", "analytic-diffusion", "training-free", config.method.replace("_", "-")]
    tags += [tag for tag in config.tags if tag not in tags]
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=config.license,
        license_name=config.license_name,
        license_link=config.license_link,
        tags=tags,
        datasets=[config.hub_dataset_id] if config.hub_dataset_id else None,
    )
    paper = config.paper
    if config.hub_dataset_id:
        dataset_link = f"[{config.dataset_name}](https://huggingface.co/datasets/{config.hub_dataset_id})"
    elif data["source"] in BUILTIN_DATASETS:
        dataset_link = f"{config.dataset_name} (the built-in `{data['source']}` set of diffusers-analytic)"
    else:
        dataset_link = config.dataset_name
    resolution = (
        f"{data['resolution']}x{data['resolution']}, {data['channels']} channel{'s' if data['channels'] > 1 else ''}"
    )
    resolution += " (shorter side resized, then center-cropped)" if data["resize"] else " (native size)"
    params = ", ".join(f"`{k}={v}`" for k, v in config.params.items()) or "the defaults"
    scheduler_config = {k: v for k, v in config.scheduler.items() if k != "class_name"}
    schedule = ", ".join(f"`{k}={v}`" for k, v in scheduler_config.items()) or "diffusers' defaults"
    sample = info.sample_config
    references = "".join(f"- [{ref['title']}]({ref['url']})\n" for ref in config.references)
    rebuild = os.path.basename(config.path) if config.path else "CONFIG.yaml"
    lines = [
        f"# {title} on {config.dataset_name}",
        "",
        f'A training-free ("analytic") diffusion model: no network was trained. {summary}',
        "",
        f"The denoiser (`{info.denoiser_class}`) takes the place of a trained UNet inside a diffusers pipeline, so it "
        "runs with any diffusers scheduler of the same noise schedule. Built with diffusers-analytic "
        "(`pip install diffusers-analytic`).",
        "",
        f"**Paper:** [{paper['title']}]({paper['url']}) ({paper['authors']}, {paper['year']}).",
        "",
    ]
    if config.description:
        lines += [config.description.strip(), ""]
    lines += [
        f"![{sample['num_images']} samples]({SAMPLE_GRID_NAME})",
        "",
        f"*{sample['num_images']} samples generated when this repo was built: {info.scheduler_class}, "
        f"{sample['num_inference_steps']} steps, seed {sample['seed']} (image i seeded from (seed, i)).*",
        "",
        "## Usage",
        "",
        "```python",
        "# pip install diffusers-analytic",
        "import torch",
        "from diffusers_analytic import AnalyticDDIMPipeline",
        "",
        f'pipe = AnalyticDDIMPipeline.from_pretrained("{config.repo_id}")',
        f"images = pipe(batch_size=16, num_inference_steps={sample['num_inference_steps']}, "
        "generator=torch.Generator().manual_seed(0)).images",
        'images[0].save("sample.png")',
        "```",
        "",
        "Load it with `AnalyticDDIMPipeline.from_pretrained` (the generic `DiffusionPipeline.from_pretrained` cannot "
        "resolve this pipeline class). `revision`, `cache_dir`, `token` and `local_files_only` work as in diffusers. "
        "From the command line:",
        "",
        "```bash",
        f"diffusers-analytic generate {config.repo_id} --num-images 64 --seed 0 --num-inference-steps 50 "
        "--output-dir samples",
        "```",
        "",
        "## How the statistics were computed",
        "",
        "| | |",
        "|---|---|",
        f"| data set | {dataset_link} |",
        f"| split | `{data['split']}` |" if data["source"] not in BUILTIN_DATASETS else "| split | all images |",
        f"| images used | {info.num_images} |",
        f"| resolution | {resolution} |",
        f"| method | `{config.method}` ({title}), parameters: {params} |",
        f"| stored in the weights | {stores} |",
        f"| scheduler | `{info.scheduler_class}`, {schedule} |",
        f"| built with | {', '.join(f'{name} {version}' for name, version in info.versions.items())} |",
        "",
        "Statistics are accumulated in float64 and stored as float32 safetensors. Rebuild or republish this repo with "
        f"`diffusers-analytic build hub_configs/{rebuild} [--push-to-hub]`.",
        "",
        f"The license follows the training data ({config.license}): the stored statistics are derived from it.",
        "",
    ]
    if references:
        lines += ["## Related work", "", references]
    lines += ["## Citation", "", "```bibtex", paper["bibtex"].strip(), "```", ""]
    return f"---\n{card_data.to_yaml()}\n---\n\n" + "\n".join(lines)


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
    from .commands.fit import save_atomically

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


# ---------------------------------------------------------------------------------------------- versions
def _is_our_component(value) -> bool:
    return (
        isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and value[0].startswith("diffusers_analytic.")
    )


def _read_json_file(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def _write_json_file(path: str, values: dict) -> None:
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as f:
        json.dump(values, f, indent=2, sort_keys=True)
        f.write("\n")
    os.replace(temporary, path)


def _fetch_model_index(pretrained_model_name_or_path, kwargs: dict) -> tuple[dict, str] | None:
    """`(model_index.json contents, where it was read)` of a local folder or a Hub repo (cache first as diffusers
    does); None when it cannot be read, so that diffusers raises its own error."""
    source = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(source):
        path = os.path.join(source, "model_index.json")
    elif is_repo_id(source):
        try:
            path = hf_hub_download(
                source,
                "model_index.json",
                revision=kwargs.get("revision"),
                cache_dir=kwargs.get("cache_dir"),
                token=kwargs.get("token"),
                local_files_only=kwargs.get("local_files_only", False),
            )
        except Exception as error:  # offline without a cache, no such repo, ...: diffusers reports it next
            logger.debug(f"Could not fetch model_index.json of {source}: {error}")
            return None
    else:
        return None
    if not os.path.isfile(path):
        return None
    try:
        return _read_json_file(path), path
    except (OSError, json.JSONDecodeError):
        return None


def _version_tuple(version: str) -> tuple[int, int]:
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release
    except InvalidVersion:
        raise ValueError(f"Invalid diffusers-analytic version {version!r} in a saved folder.") from None
    return (release + (0, 0))[:2]


def check_saved_version(pretrained_model_name_or_path, kwargs: dict | None = None) -> str | None:
    """
    Called by `AnalyticDDIMPipeline.from_pretrained` before loading: reads the folder's (or repo's) model_index.json,
    compares the diffusers-analytic version that saved it with the installed one and imports this package's component
    modules it names (so repo ids resolve too).

    A folder saved by an older or the same major.minor version loads; one saved by a newer major.minor version, or
    one that names a module or class this version does not have, is a ValueError naming both versions.

    Returns:
        `str` or `None`: the saved version (None for a folder saved without one).
    """
    import importlib

    found = _fetch_model_index(pretrained_model_name_or_path, kwargs or {})
    if found is None:
        return None
    index, path = found
    saved = index.get(VERSION_KEY)
    saved_by = f"diffusers-analytic {saved}" if saved is not None else "an unknown version of diffusers-analytic"
    if saved is not None and _version_tuple(str(saved)) > _version_tuple(__version__):
        raise ValueError(
            f"{pretrained_model_name_or_path} was saved by diffusers-analytic {saved}, newer than the installed "
            f"{__version__}; upgrade with `pip install -U diffusers-analytic`."
        )
    for name, value in index.items():
        if not _is_our_component(value):
            continue
        module_name, class_name = value
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is None or not hasattr(module, class_name):
            raise ValueError(
                f"{pretrained_model_name_or_path} was saved by {saved_by}; its component `{name}` is "
                f"{module_name}.{class_name}, which the installed diffusers-analytic {__version__} does not have."
            )
    if saved is not None and str(saved) != __version__:
        logger.info(
            f"Loading {pretrained_model_name_or_path}, saved by diffusers-analytic {saved}, with {__version__}."
        )
    return None if saved is None else str(saved)


# ---------------------------------------------------------------------------------------------- push
def default_commit_message(folder: str | os.PathLike) -> str:
    """`"Upload WienerDenoiser pipeline (diffusers-analytic 0.1.0)"`, from the folder's model_index.json."""
    index = _read_json_file(os.path.join(os.fspath(folder), "model_index.json"))
    denoiser = index.get("unet", [None, "analytic"])[1]
    version = index.get(VERSION_KEY, __version__)
    return f"Upload {denoiser} pipeline (diffusers-analytic {version})"


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """A ValueError unless `folder` is a saved pipeline folder: model_index.json and each component's sub-folder."""
    folder = os.fspath(folder)
    index_path = os.path.join(folder, "model_index.json")
    if not os.path.isfile(index_path):
        raise ValueError(
            f"{folder} is not a pipeline folder: it has no model_index.json (build one with `build` or `fit`)."
        )
    index = _read_json_file(index_path)
    missing = [
        name
        for name, value in index.items()
        if isinstance(value, list) and value and value[0] is not None and not os.path.isdir(os.path.join(folder, name))
    ]
    if missing:
        raise ValueError(f"{folder} is incomplete: model_index.json names {missing} but the sub-folders are missing.")


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    private: bool | None = None,
    revision: str | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    create_pr: bool = False,
):
    """
    Uploads a built pipeline folder to the Hub as ONE commit: creates the model repo if needed
    (`create_repo(exist_ok=True)`), the branch `revision` if given, then `upload_folder`.

    Args:
        folder (`str`): a folder written by `diffusers-analytic build` (or `fit`).
        repo_id (`str`): `org/name`.
        private (`bool`, *optional*): visibility of a newly created repo (the Hub's default if None).
        revision (`str`, *optional*): the branch to commit to (created from main if missing).
        token (`str`, *optional*): a Hub token (the stored login if None).
        commit_message (`str`, *optional*): defaults to [`default_commit_message`].
        create_pr (`bool`): open a pull request instead of committing to the branch.

    Returns:
        The `CommitInfo` of the upload.
    """
    folder = os.fspath(folder)
    check_repo_id(repo_id)
    check_pipeline_folder(folder)
    if not os.path.isfile(os.path.join(folder, CARD_NAME)):
        logger.warning(f"{folder} has no {CARD_NAME}: the repo will have no model card (`build` writes one).")
    message = commit_message or default_commit_message(folder)
    create_repo(repo_id, token=token, private=private, repo_type="model", exist_ok=True)
    if revision is not None and revision != "main":
        create_branch(repo_id, branch=revision, token=token, repo_type="model", exist_ok=True)
    commit = upload_folder(
        repo_id=repo_id,
        folder_path=folder,
        commit_message=message,
        token=token,
        repo_type="model",
        revision=revision,
        create_pr=create_pr,
        ignore_patterns=[".tmp-*", "*.tmp", ".cache/*"],
    )
    logger.info(f"Pushed {folder} to https://huggingface.co/{repo_id}")
    return commit


def hub_config_paths(directory: str | os.PathLike) -> list[str]:
    """The `*.yaml` files of a hub_configs folder, sorted."""
    directory = os.fspath(directory)
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith((".yaml", ".yml")))
