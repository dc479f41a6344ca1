"""Hub configs (`hub_configs/*.yaml`): the schema, [`HubConfig`], validation and loading, and Hub repo ids.

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
import os
import re
from dataclasses import dataclass, field
from typing import Any

import diffusers
import yaml

from .. import __version__
from ..data import BUILTIN_DATASETS
from ..kernels.schedule import SCHEDULE_KEYS
from ..registry import DENOISERS
from ..saving import is_repo_id

# The methods a hub config may name: the registered denoisers that have a published repo per data set.
HUB_METHODS = ("wiener", "optimal", "scfdm", "pca_locality", "nearest_dataset", "ls", "els")

# Keys of a scheduler config that are the training noise schedule and prediction type: they go to the denoiser too.
DENOISER_SCHEDULER_KEYS = (*SCHEDULE_KEYS, "prediction_type")

# Denoiser `__init__` arguments that are not method parameters: set from the data (size) or from `scheduler`.
_NOT_METHOD_PARAMS = {"self", "sample_size", "in_channels", *DENOISER_SCHEDULER_KEYS}

DEFAULT_ORG = "diffusers-analytic"


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
_REFERENCE_SCHEMA = {"title": _Field((str,)), "url": _Field((str,))}
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


# ---------------------------------------------------------------------------------------------- repo ids
def check_repo_id(repo_id: str, what: str = "repo id") -> str:
    """`repo_id` if it is a valid `org/name` Hub repo id, else a ValueError."""
    if repo_id.count("/") != 1 or not is_repo_id(repo_id):
        raise ValueError(f"The {what} must look like `org/name` (letters, digits, '-', '_', '.'), got {repo_id!r}.")
    return repo_id


def default_repo_id(method: str, dataset: str, org: str = DEFAULT_ORG) -> str:
    """The naming scheme of the published repos: `("pca_locality", "CIFAR-10")` -> `"diffusers-analytic/pca-locality-cifar-10"`."""
    slug = lambda text: re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")  # noqa: E731
    return check_repo_id(f"{org}/{slug(method)}-{slug(dataset)}")


# ---------------------------------------------------------------------------------------------- methods, schedulers
def denoiser_class_for(method: str):
    """The registered class of a hub method; a ValueError naming the installed version if it is not available."""
    if method not in HUB_METHODS:
        raise ValueError(f"Unknown method {method!r}; choose one of {list(HUB_METHODS)}.")
    if method not in DENOISERS:
        raise ValueError(
            f"The method {method!r} is not available in this installation of diffusers-analytic {__version__} "
            f"(registered: {sorted(DENOISERS)})."
        )
    return DENOISERS[method]


def method_params(method: str) -> list[str]:
    """The parameters a hub config's `params` may give `method`: its class's config keywords other than the image
    size and the noise schedule (those come from `data` and `scheduler`)."""
    accepted = set(inspect.signature(denoiser_class_for(method).__init__).parameters) - _NOT_METHOD_PARAMS
    return sorted(accepted)


def scheduler_class_and_kwargs(scheduler: dict):
    """`(scheduler class, its config keys of the hub config)`; a ValueError for an unknown class or key."""
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


# ---------------------------------------------------------------------------------------------- validation
def validate_hub_config(raw: Any, where: str = "hub config") -> HubConfig:
    """
    Checks a parsed hub config against the schema and returns it completed with defaults.

    Raises a ValueError naming the file (`where`) and the key for unknown keys, missing fields, wrong types, an unknown
    or unregistered method, method parameters the method's class does not take, an unknown scheduler or scheduler key,
    a bad repo id.
    """
    values = _check_section(raw, HUB_CONFIG_SCHEMA, where)
    values["references"] = [
        _check_section(reference, _REFERENCE_SCHEMA, where, f"references[{i}].")
        for i, reference in enumerate(values["references"])
    ]
    try:
        _check_values(values)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None
    return HubConfig(**values)


def _check_values(values: dict) -> None:
    """The checks beyond the schema's keys and types, on a config completed with defaults."""
    method = values["method"]
    if method not in HUB_METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {list(HUB_METHODS)}.")
    accepted = method_params(method)
    unknown = sorted(set(values["params"]) - set(accepted))
    if unknown:
        raise ValueError(f"method {method!r} takes no parameter {unknown}; it accepts {accepted}.")
    check_repo_id(values["repo_id"], "`repo_id`")
    data = values["data"]
    if data["channels"] not in (1, 3):
        raise ValueError(f"`data.channels` must be 1 or 3, got {data['channels']}.")
    for key in ("resolution", "batch_size"):
        if data[key] < 1:
            raise ValueError(f"`data.{key}` must be positive, got {data[key]}.")
    if data["max_images"] is not None and data["max_images"] < 1:
        raise ValueError(f"`data.max_images` must be positive or null, got {data['max_images']}.")
    if data["options"]:
        if data["source"] != "patches":
            raise ValueError(f"`data.options` is only for the built-in `patches` set, got {data['options']}.")
        unknown = sorted(set(data["options"]) - {"num_images", "seed"})
        if unknown:
            raise ValueError(f"unknown `data.options` {unknown}; the `patches` set takes num_images and seed.")
    try:
        scheduler_class_and_kwargs(values["scheduler"])
    except ValueError as error:
        raise ValueError(f"`scheduler`: {error}") from None
    if values["license"] == "other" and not (values["license_name"] and values["license_link"]):
        raise ValueError("`license: other` needs `license_name` and `license_link`.")
    if not all(isinstance(tag, str) for tag in values["tags"]):
        raise ValueError(f"`tags` must be a list of strings, got {values['tags']}.")
    sample = values["sample"]
    if sample["num_images"] < 1 or sample["num_inference_steps"] < 1:
        raise ValueError(f"`sample.num_images` and `sample.num_inference_steps` must be positive, got {sample}.")


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


def hub_config_paths(directory: str | os.PathLike) -> list[str]:
    """The `*.yaml` files of a hub_configs folder, sorted."""
    directory = os.fspath(directory)
    return sorted(os.path.join(directory, name) for name in os.listdir(directory) if name.endswith((".yaml", ".yml")))
