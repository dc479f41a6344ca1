"""Method names -> denoiser classes, for the CLI and the Hub configs. A literal dict: nothing registers itself."""

from __future__ import annotations

import inspect
import numbers
import types
import typing

from .data import DATA_SOURCE_KEYWORDS
from .models.denoiser_equivariant_local_score import EquivariantLocalScoreDenoiser
from .models.denoiser_local_score import LocalScoreDenoiser
from .models.denoiser_nearest import NearestDatasetDenoiser
from .models.denoiser_optimal import OptimalDenoiser
from .models.denoiser_pca_locality import PCALocalityDenoiser
from .models.denoiser_smoothed_cfdm import SmoothedCFDMDenoiser
from .models.denoiser_wiener import WienerDenoiser

DENOISERS = {
    "wiener": WienerDenoiser,
    "ls": LocalScoreDenoiser,
    "els": EquivariantLocalScoreDenoiser,
    "optimal": OptimalDenoiser,
    "scfdm": SmoothedCFDMDenoiser,
    "nearest_dataset": NearestDatasetDenoiser,
    "pca_locality": PCALocalityDenoiser,
}


def get_denoiser_class(method: str):
    """The denoiser class of a method name such as `"wiener"`; a ValueError lists the known names otherwise."""
    try:
        return DENOISERS[method]
    except KeyError:
        raise ValueError(f"Unknown method {method!r}; choose one of {sorted(DENOISERS)}.") from None


# Config values that `from_dataset` reads from the data (`sample_size`, `in_channels` may be given if they agree).
_SET_BY_DATA = ("sample_size", "in_channels", "num_images", "has_labels")
_NOT_OPTIONS = ("self", "cls", "images", "batch_size", "show_progress")


def config_options(denoiser_class) -> dict[str, typing.Any]:
    """
    `{option: default}` of a denoiser class: the keywords of its `from_dataset` (e.g. `storage_dtype`) and of its
    `__init__` (its config) less those read from the data. What `fit --config KEY=VALUE` accepts.
    """
    options = {}
    for function in (denoiser_class.from_dataset, denoiser_class.__init__):
        for name, parameter in inspect.signature(function).parameters.items():
            if parameter.kind in (parameter.VAR_KEYWORD, parameter.VAR_POSITIONAL):
                continue
            if name not in _NOT_OPTIONS and name not in _SET_BY_DATA:
                options.setdefault(name, parameter.default)
    return options


def check_config(denoiser_class, config: dict) -> None:
    """
    Checks `from_dataset` keywords before any data is read: an unknown key is a ValueError listing the known ones,
    a value of the wrong type (by the annotations of `__init__` / `from_dataset`) a TypeError naming it.
    """
    options = config_options(denoiser_class)
    accepted = set(options) | {"sample_size", "in_channels"} | set(DATA_SOURCE_KEYWORDS)
    unknown = sorted(set(config) - accepted)
    if unknown:
        raise ValueError(
            f"{denoiser_class.__name__} has no option {', '.join(map(repr, unknown))}; its options are "
            f"{', '.join(sorted(options))}."
        )
    hints = {}
    for function in (denoiser_class.from_dataset, denoiser_class.__init__):
        hints.update(typing.get_type_hints(function))
    for key, value in config.items():
        hint = hints.get(key)
        if hint is not None and not _has_type(value, hint):
            raise TypeError(f"`{key}` of {denoiser_class.__name__} must be {_describe(hint)}, got {value!r}.")


def _has_type(value, hint) -> bool:
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in args)
    if hint is type(None):
        return value is None
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, numbers.Real) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    if hint in (list, tuple) or origin in (list, tuple):
        if not isinstance(value, (list, tuple)):
            return False
        if origin is tuple and args and args[-1] is not Ellipsis:
            return len(value) == len(args) and all(_has_type(v, a) for v, a in zip(value, args))
        element = args[0] if args else None
        return element is None or all(_has_type(v, element) for v in value)
    return True  # an annotation this check does not know: not checked


def _describe(hint) -> str:
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        return " or ".join(_describe(arg) for arg in typing.get_args(hint))
    if hint is type(None):
        return "None"
    return hint.__name__ if isinstance(hint, type) else str(hint)
