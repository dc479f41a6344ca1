"""Saved pipeline folders: writing them atomically, the package version they record, and the checks made before
loading one.

A low layer: it imports only the standard library, huggingface_hub, packaging and the package version, so that the
pipeline, the Hub layer and the commands can all use it.
"""

from __future__ import annotations

import importlib
import json
import logging
import os
import shutil
import tempfile

from huggingface_hub import hf_hub_download
from huggingface_hub.utils import HFValidationError, validate_repo_id
from packaging.version import InvalidVersion, Version

from . import __version__

logger = logging.getLogger(__name__)

# The key under which saved folders record the package version (model_index.json and the denoiser's config.json).
# diffusers ignores config keys that start with "_" when it builds a class from a config, without a warning.
VERSION_KEY = "_diffusers_analytic_version"

MODEL_INDEX_NAME = "model_index.json"

# Components saved under a module path of this package: diffusers resolves them only once the module is imported.
_OUR_MODULE_PREFIX = "diffusers_analytic."


def save_atomically(pipeline, output_dir: str, overwrite: bool = False, write_extra=None) -> None:
    """
    `save_pretrained` into a temporary folder beside `output_dir`, then rename: never a half-written folder.
    `write_extra(folder)`, if given, adds files (a model card) to the temporary folder before the rename.
    """
    output_dir = os.path.abspath(output_dir)
    if os.path.exists(output_dir) and not overwrite:
        raise ValueError(f"{output_dir} exists; pass --overwrite to replace it.")
    parent = os.path.dirname(output_dir)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=".tmp-", dir=parent)
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(staging, 0o777 & ~umask)  # mkdtemp makes it private; the result is an ordinary folder
    try:
        pipeline.save_pretrained(staging)
        if write_extra is not None:
            write_extra(staging)
        if os.path.exists(output_dir):
            shutil.rmtree(output_dir)
        os.replace(staging, output_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def is_repo_id(name: str) -> bool:
    """True for a string shaped like a Hub repo id (`"name"` or `"org/name"`)."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def read_model_index(
    pretrained_model_name_or_path: str | os.PathLike,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> dict | None:
    """
    The `model_index.json` of a local pipeline folder, or of a Hub repo id (the cache first, as diffusers reads it;
    `HF_HUB_OFFLINE=1` reads only the cache). None when it cannot be read (no such folder or repo, offline without a
    cache, not JSON), so that the caller or diffusers reports the problem in its own words.
    """
    source = os.fspath(pretrained_model_name_or_path)
    if os.path.isdir(source):
        path = os.path.join(source, MODEL_INDEX_NAME)
    elif is_repo_id(source):
        try:
            path = hf_hub_download(
                source,
                MODEL_INDEX_NAME,
                revision=revision,
                cache_dir=cache_dir,
                token=token,
                local_files_only=local_files_only,
            )
        except Exception as error:  # offline without a cache, no such repo, ...: diffusers reports it next
            logger.debug(f"Could not fetch {MODEL_INDEX_NAME} of {source}: {error}")
            return None
    else:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, json.JSONDecodeError):
        return None
    return index if isinstance(index, dict) else None


def _version_tuple(version: str) -> tuple[int, int]:
    """`"0.1.3"` -> `(0, 1)`: folders are compatible within a major.minor version."""
    try:
        release = Version(version).release
    except InvalidVersion:
        raise ValueError(f"Invalid diffusers-analytic version {version!r} in a saved folder.") from None
    return (release + (0, 0))[:2]


def _our_components(index: dict) -> dict[str, tuple[str, str]]:
    """`{component name: (module, class)}` of the components saved under a module of this package."""
    return {
        name: (value[0], value[1])
        for name, value in index.items()
        if isinstance(value, list)
        and len(value) == 2
        and isinstance(value[0], str)
        and isinstance(value[1], str)
        and value[0].startswith(_OUR_MODULE_PREFIX)
    }


def check_saved_version(pretrained_model_name_or_path, kwargs: dict | None = None) -> str | None:
    """
    Prepares loading a saved pipeline (`AnalyticDDIMPipeline.from_pretrained` calls it first): reads the folder's
    (or the repo's) model_index.json once, compares the diffusers-analytic version that saved it with the installed
    one, and imports the modules of this package that it names (diffusers resolves a component saved under a module
    path only once that module is imported, so repo ids resolve too).

    A folder saved by an older or the same major.minor version loads (an older one with an info log); one saved by a
    newer major.minor version, or one that names a module or class this version does not have, is a ValueError naming
    both versions. When model_index.json cannot be read, nothing is checked and diffusers reports the problem.

    Args:
        pretrained_model_name_or_path (`str` or `os.PathLike`): a local folder or a Hub repo id.
        kwargs (`dict`, *optional*): the keywords given to `from_pretrained`; `revision`, `cache_dir`, `token` and
            `local_files_only` are used to find model_index.json.

    Returns:
        `str` or `None`: the saved version (None for a folder saved without one, or an unreadable one).
    """
    kwargs = kwargs or {}
    index = read_model_index(
        pretrained_model_name_or_path,
        revision=kwargs.get("revision"),
        cache_dir=kwargs.get("cache_dir"),
        token=kwargs.get("token"),
        local_files_only=kwargs.get("local_files_only", False),
    )
    if index is None:
        return None
    saved = index.get(VERSION_KEY)
    saved = None if saved is None else str(saved)
    if saved is not None and _version_tuple(saved) > _version_tuple(__version__):
        raise ValueError(
            f"{pretrained_model_name_or_path} was saved by diffusers-analytic {saved}, newer than the installed "
            f"{__version__}; update your clone of the diffusers-analytic repository and reinstall it (`pip install -e .`)."
        )
    saved_by = f"diffusers-analytic {saved}" if saved is not None else "an unknown version of diffusers-analytic"
    for name, (module_name, class_name) in _our_components(index).items():
        try:
            module = importlib.import_module(module_name)
        except ImportError:
            module = None
        if module is None or not hasattr(module, class_name):
            raise ValueError(
                f"{pretrained_model_name_or_path} was saved by {saved_by}; its component `{name}` is "
                f"{module_name}.{class_name}, which the installed diffusers-analytic {__version__} does not have."
            )
    if saved is not None and saved != __version__:
        logger.info(
            f"Loading {pretrained_model_name_or_path}, saved by diffusers-analytic {saved}, with {__version__}."
        )
    return saved


def write_json(data: dict, path: str, default=None) -> None:
    """
    `data` as indented JSON at `path`, written to a temporary file beside it and renamed: never half written.
    `default` converts values JSON does not know (as in `json.dump`); without it they are a TypeError.
    """
    temporary = f"{path}.tmp-{os.getpid()}"
    try:
        with open(temporary, "w") as f:
            json.dump(data, f, indent=2, default=default)
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
