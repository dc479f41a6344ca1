"""The model card (README.md) of a built repo: huggingface_hub's `ModelCardData` for the YAML metadata, rendered with
`ModelCard.from_template` and the Markdown template below."""

from __future__ import annotations

import os
from dataclasses import dataclass

from huggingface_hub import ModelCard, ModelCardData

from ..data import BUILTIN_DATASETS
from .config import HubConfig

CARD_NAME = "README.md"
SAMPLE_GRID_NAME = "samples.png"

# What the model card says about each method: (title, how it denoises, what its weights store).
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
    "ls": (
        "Local score (LS) machine",
        "Each output pixel is a posterior mean over the training images that sees only the k x k patch around it, "
        "compared at the same location in every image (Kamb & Ganguli 2025); k grows with the noise level "
        "following the authors' calibrated schedule (`patch_size_schedule`).",
        "the training images themselves (8-bit sources are stored as uint8)",
    ),
    "els": (
        "Equivariant local score (ELS) machine",
        "Each output pixel is a posterior mean over every training patch from every location that sees only the k x k "
        "patch around it (Kamb & Ganguli 2025), the closed form that predicts trained convolutional diffusion models; "
        "`boundary_aware` border pixels see only training patches with the same border overflow, and k grows with "
        "the noise level following the authors' calibrated schedule (`patch_size_schedule`).",
        "the training images themselves (8-bit sources are stored as uint8); patches are cut on the fly",
    ),
}

# A Jinja template (huggingface_hub's `ModelCard.from_template`); `card_data` is the YAML metadata.
CARD_TEMPLATE = """\
---
{{ card_data }}
---

# {{ title }} on {{ dataset_name }}

A training-free ("analytic") diffusion model: no network was trained. {{ summary }}

The denoiser (`{{ denoiser_class }}`) takes the place of a trained UNet inside a diffusers pipeline, so it runs with \
any diffusers scheduler of the same noise schedule. Built with diffusers-analytic, which is not on \
PyPI: install it from a clone of its repository (`pip install -e ./diffusers-analytic`).

**Paper:** [{{ paper.title }}]({{ paper.url }}) ({{ paper.authors }}, {{ paper.year }}).

{% if description %}{{ description }}

{% endif %}![{{ sample.num_images }} samples]({{ sample_grid }})

*{{ sample.num_images }} samples generated when this repo was built: {{ scheduler_class }}, \
{{ sample.num_inference_steps }} steps, seed {{ sample.seed }} (image i seeded from (seed, i)).*

## Usage

```python
# pip install -e ./diffusers-analytic   (a clone of the diffusers-analytic repository; it is not on PyPI)
import torch
from diffusers_analytic import AnalyticDDIMPipeline

pipe = AnalyticDDIMPipeline.from_pretrained("{{ repo_id }}")
images = pipe(batch_size=16, num_inference_steps={{ sample.num_inference_steps }}, \
generator=torch.Generator().manual_seed(0)).images
images[0].save("sample.png")
```

Load it with `AnalyticDDIMPipeline.from_pretrained` (the generic `DiffusionPipeline.from_pretrained` cannot resolve \
this pipeline class). `revision`, `cache_dir`, `token` and `local_files_only` work as in diffusers. From the command \
line:

```bash
diffusers-analytic generate {{ repo_id }} --num-images 64 --seed 0 --num-inference-steps 50 --output-dir samples
```

## How the statistics were computed

| | |
|---|---|
| data set | {{ dataset_link }} |
| split | {{ split }} |
| images used | {{ num_images }} |
| resolution | {{ resolution }} |
| method | `{{ method }}` ({{ title }}), parameters: {{ params }} |
| stored in the weights | {{ stores }} |
| scheduler | `{{ scheduler_class }}`, {{ schedule }} |
| built with | {{ versions }} |

Statistics are accumulated in float64 and stored as float32 safetensors. Rebuild or republish this repo with \
`diffusers-analytic build hub_configs/{{ rebuild }} [--push-to-hub]`.

The license follows the training data ({{ license }}): the stored statistics are derived from it.
{% if references %}
## Related work

{% for reference in references %}- [{{ reference.title }}]({{ reference.url }})
{% endfor %}{% endif %}
## Citation

```bibtex
{{ bibtex }}
```

"""


@dataclass
class BuildInfo:
    """What a build did, for the model card."""

    num_images: int
    denoiser_class: str
    sample_config: dict
    scheduler_class: str
    versions: dict


def card_data(config: HubConfig) -> ModelCardData:
    """The YAML metadata of the model card: library, task, license, tags and the Hub data set, if any."""
    tags = ["diffusers", "diffusers-analytic", "analytic-diffusion", "training-free", config.method.replace("_", "-")]
    tags += [tag for tag in config.tags if tag not in tags]
    return ModelCardData(
        library_name="diffusers",
        pipeline_tag="unconditional-image-generation",
        license=config.license,
        license_name=config.license_name,
        license_link=config.license_link,
        tags=tags,
        datasets=[config.hub_dataset_id] if config.hub_dataset_id else None,
    )


def _dataset_link(config: HubConfig) -> str:
    if config.hub_dataset_id:
        return f"[{config.dataset_name}](https://huggingface.co/datasets/{config.hub_dataset_id})"
    if config.data["source"] in BUILTIN_DATASETS:
        return f"{config.dataset_name} (the built-in `{config.data['source']}` set of diffusers-analytic)"
    return config.dataset_name


def _resolution(data: dict) -> str:
    channels = data["channels"]
    text = f"{data['resolution']}x{data['resolution']}, {channels} channel{'s' if channels > 1 else ''}"
    return text + (" (shorter side resized, then center-cropped)" if data["resize"] else " (native size)")


def render_model_card(config: HubConfig, info: BuildInfo) -> str:
    """The model card (README.md with YAML metadata) of a built pipeline folder."""
    title, summary, stores = METHOD_CARD_TEXT[config.method]
    data = config.data
    scheduler_config = {k: v for k, v in config.scheduler.items() if k != "class_name"}
    card = ModelCard.from_template(
        card_data(config),
        template_str=CARD_TEMPLATE,
        title=title,
        summary=summary,
        stores=stores,
        dataset_name=config.dataset_name,
        dataset_link=_dataset_link(config),
        denoiser_class=info.denoiser_class,
        scheduler_class=info.scheduler_class,
        num_images=info.num_images,
        sample=info.sample_config,
        sample_grid=SAMPLE_GRID_NAME,
        paper=config.paper,
        description=(config.description or "").strip(),
        repo_id=config.repo_id,
        split="all images" if data["source"] in BUILTIN_DATASETS else f"`{data['split']}`",
        resolution=_resolution(data),
        method=config.method,
        params=", ".join(f"`{k}={v}`" for k, v in config.params.items()) or "the defaults",
        schedule=", ".join(f"`{k}={v}`" for k, v in scheduler_config.items()) or "diffusers' defaults",
        versions=", ".join(f"{name} {version}" for name, version in info.versions.items()),
        rebuild=os.path.basename(config.path) if config.path else "CONFIG.yaml",
        license=config.license,
        references=config.references,
        bibtex=config.paper["bibtex"].strip(),
    )
    return str(card)
