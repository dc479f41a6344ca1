"""`diffusers-analytic push`: everything up to the one upload call into huggingface_hub (which is monkeypatched)."""

import os
import shutil

import pytest

from diffusers_analytic import __version__, hub
from diffusers_analytic.commands.cli import main
from diffusers_analytic.hub import push as hub_push

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    config = hub.load_hub_config(os.path.join(REPO_ROOT, "hub_configs", "wiener-digits.yaml"))
    config.sample = {"num_images": 4, "num_inference_steps": 3, "seed": 0}
    folder = tmp_path_factory.mktemp("push") / "wiener-digits"
    hub.build(config, str(folder), show_progress=False)
    return folder


@pytest.fixture
def hub_calls(monkeypatch):
    """Records the huggingface_hub calls `hub.push_folder` makes, in order; the upload sees the folder as it is at that time."""
    calls = []

    def create_repo(repo_id, **kwargs):
        calls.append(("create_repo", {"repo_id": repo_id, **kwargs}))
        return f"https://huggingface.co/{repo_id}"

    def create_branch(repo_id, **kwargs):
        calls.append(("create_branch", {"repo_id": repo_id, **kwargs}))

    def upload_folder(**kwargs):
        files = sorted(
            os.path.relpath(os.path.join(root, name), kwargs["folder_path"])
            for root, _, names in os.walk(kwargs["folder_path"])
            for name in names
        )
        calls.append(("upload_folder", {**kwargs, "files": files}))
        return "commit-info"

    monkeypatch.setattr(hub_push, "create_repo", create_repo)
    monkeypatch.setattr(hub_push, "create_branch", create_branch)
    monkeypatch.setattr(hub_push, "upload_folder", upload_folder)
    return calls


def test_push_cli_uploads_the_folder_in_one_commit(built, hub_calls):
    argv = [
        "push",
        str(built),
        "--repo-id",
        "someone/wiener-digits",
        "--private",
        "--revision",
        "v2",
        "--token",
        "hf_abc",
        "--commit-message",
        "Rebuild with 1797 digits",
    ]
    assert main(argv) == 0
    assert [name for name, _ in hub_calls] == ["create_repo", "create_branch", "upload_folder"]
    create = hub_calls[0][1]
    assert create == {
        "repo_id": "someone/wiener-digits",
        "token": "hf_abc",
        "private": True,
        "repo_type": "model",
        "exist_ok": True,
    }
    assert hub_calls[1][1]["branch"] == "v2" and hub_calls[1][1]["exist_ok"] is True
    upload = hub_calls[2][1]
    assert upload["repo_id"] == "someone/wiener-digits"
    assert upload["folder_path"] == str(built)
    assert upload["commit_message"] == "Rebuild with 1797 digits"
    assert upload["revision"] == "v2" and upload["token"] == "hf_abc" and upload["repo_type"] == "model"
    assert upload["files"] == [
        "README.md",
        "model_index.json",
        "samples.png",
        os.path.join("scheduler", "scheduler_config.json"),
        os.path.join("unet", "config.json"),
        os.path.join("unet", "diffusion_pytorch_model.safetensors"),
    ]


def test_push_defaults(built, hub_calls):
    assert main(["push", str(built), "--repo-id", "someone/wiener-digits"]) == 0
    assert [name for name, _ in hub_calls] == ["create_repo", "upload_folder"]  # no branch to create for main
    assert hub_calls[0][1]["private"] is None  # the Hub's default visibility
    upload = hub_calls[1][1]
    assert upload["commit_message"] == f"Upload WienerDenoiser pipeline (diffusers-analytic {__version__})"
    assert upload["revision"] is None and upload["token"] is None


@pytest.mark.parametrize(
    "break_folder, repo_id, message",
    [
        (lambda folder: os.remove(folder / "model_index.json"), "a/b", "has no model_index.json"),
        (lambda folder: shutil.rmtree(folder / "unet"), "a/b", "names ['unet'] but the sub-folders are missing"),
        (lambda folder: None, "not a repo id", "must look like `org/name`"),
        (lambda folder: None, "just-a-name", "must look like `org/name`"),
    ],
)
def test_push_rejects_bad_input_before_any_hub_call(
    built, hub_calls, tmp_path, capsys, break_folder, repo_id, message
):
    folder = tmp_path / "copy"
    shutil.copytree(built, folder)
    break_folder(folder)
    assert main(["push", str(folder), "--repo-id", repo_id]) == 2
    assert message in capsys.readouterr().err
    assert hub_calls == []


def test_push_folder_without_card_warns_but_uploads(built, hub_calls, tmp_path):
    folder = tmp_path / "fit-output"
    shutil.copytree(built, folder)
    os.remove(folder / "README.md")
    assert hub.push_folder(folder, "someone/plain") == "commit-info"
    assert hub_calls[-1][1]["files"][0] == "model_index.json"
