"""The Hub layer: hub configs (`hub_configs/*.yaml`), building a repo folder with a model card and a sample grid, and
pushing it to the Hub.

- `config`: the hub config schema, [`HubConfig`], validation and loading, repo id checks;
- `model_card`: the model card (README.md) of a built folder;
- `builder`: the config's data, the fitted pipeline, the sample grid, [`build`];
- `push`: checking a folder and uploading it as one commit.

Saving folders atomically and the version checks when loading are in `diffusers_analytic.saving`.
"""

from .builder import ConfiguredImages, build, fit_pipeline, sample_grid
from .config import (
    DEFAULT_ORG,
    HUB_CONFIG_SCHEMA,
    HUB_METHODS,
    HubConfig,
    check_repo_id,
    default_repo_id,
    denoiser_class_for,
    hub_config_paths,
    load_hub_config,
    method_params,
    validate_hub_config,
)
from .model_card import CARD_NAME, SAMPLE_GRID_NAME, BuildInfo, render_model_card
from .push import check_pipeline_folder, default_commit_message, push_folder

__all__ = [
    "CARD_NAME",
    "DEFAULT_ORG",
    "HUB_CONFIG_SCHEMA",
    "HUB_METHODS",
    "SAMPLE_GRID_NAME",
    "BuildInfo",
    "ConfiguredImages",
    "HubConfig",
    "build",
    "check_pipeline_folder",
    "check_repo_id",
    "default_commit_message",
    "default_repo_id",
    "denoiser_class_for",
    "fit_pipeline",
    "hub_config_paths",
    "load_hub_config",
    "method_params",
    "push_folder",
    "render_model_card",
    "sample_grid",
    "validate_hub_config",
]
