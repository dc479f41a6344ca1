"""Pushing a built pipeline folder to the Hub as one commit, with `huggingface_hub`."""

from __future__ import annotations

import os

from diffusers.utils import logging
from huggingface_hub import create_branch, create_repo, upload_folder
from huggingface_hub.errors import LocalTokenNotFoundError, OfflineModeIsEnabled

from .. import __version__
from ..saving import MODEL_INDEX_NAME, VERSION_KEY, read_model_index
from .config import check_repo_id
from .model_card import CARD_NAME

logger = logging.get_logger(__name__)


def default_commit_message(folder: str | os.PathLike) -> str:
    """`"Upload WienerDenoiser pipeline (diffusers-analytic 0.1.0)"`, from the folder's model_index.json."""
    index = read_model_index(folder) or {}
    denoiser = index.get("unet", [None, "analytic"])[1]
    version = index.get(VERSION_KEY, __version__)
    return f"Upload {denoiser} pipeline (diffusers-analytic {version})"


def check_pipeline_folder(folder: str | os.PathLike) -> None:
    """A ValueError unless `folder` is a saved pipeline folder: model_index.json and each component's sub-folder."""
    folder = os.fspath(folder)
    if not os.path.isfile(os.path.join(folder, MODEL_INDEX_NAME)):
        raise ValueError(
            f"{folder} is not a pipeline folder: it has no {MODEL_INDEX_NAME} (build one with `build` or `fit`)."
        )
    index = read_model_index(folder)
    if index is None:
        raise ValueError(f"{folder} is not a pipeline folder: its {MODEL_INDEX_NAME} is not a JSON mapping.")
    missing = [
        name
        for name, value in index.items()
        if isinstance(value, list) and value and value[0] is not None and not os.path.isdir(os.path.join(folder, name))
    ]
    if missing:
        raise ValueError(
            f"{folder} is incomplete: {MODEL_INDEX_NAME} names {missing} but the sub-folders are missing."
        )


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
    try:
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
    except Exception as error:
        problem = hub_failure(error, f"push {folder} to {repo_id}")
        if problem is None:
            raise
        raise problem from error
    logger.info(f"Pushed {folder} to https://huggingface.co/{repo_id}")
    return commit


def hub_failure(error: Exception, action: str) -> OSError | None:
    """
    A one-line `ConnectionError` / `PermissionError` saying why `action` could not reach the Hub and what to do
    (network, `HF_HUB_OFFLINE`, `huggingface-cli login`), or None when `error` is not a network or auth failure.
    """
    cause = " ".join(f"{type(error).__name__}: {error}".split())
    if len(cause) > 200:
        cause = cause[:197] + "..."
    status = getattr(getattr(error, "response", None), "status_code", None)
    if isinstance(error, OfflineModeIsEnabled):
        return ConnectionError(
            f"Cannot {action}: offline mode is on (HF_HUB_OFFLINE=1); unset HF_HUB_OFFLINE to push."
        )
    if isinstance(error, LocalTokenNotFoundError) or status in (401, 403):
        return PermissionError(
            f"Cannot {action}: the Hub refused the credentials ({cause}); log in with `huggingface-cli login` (or "
            "pass --token) with a token that may write to this repo."
        )
    network = isinstance(error, (ConnectionError, TimeoutError)) or type(error).__module__.split(".")[0] in (
        "httpx",
        "httpx2",
        "httpcore",
        "requests",
        "urllib3",
    )
    if network and status is None:
        return ConnectionError(
            f"Cannot {action}: the Hub is unreachable ({cause}); check the network, or set HF_HUB_OFFLINE=1 to work "
            "offline and push later."
        )
    return None
