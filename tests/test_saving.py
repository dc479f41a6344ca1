"""diffusers_analytic.saving: atomic folder writes, reading model_index.json (folder or Hub cache, offline) and the
version check made before loading. Stub folders and pipelines: no fitting here."""

import ast
import json
import logging
import os
import sys

import pytest

import diffusers_analytic
from diffusers_analytic import saving

INSTALLED = diffusers_analytic.__version__
WIENER = ["diffusers_analytic.models.denoiser_wiener", "WienerDenoiser"]


class StubPipeline:
    """Writes what `save_pretrained` would, or fails half-way when told to."""

    def __init__(self, tag: str, fail: bool = False):
        self.tag, self.fail = tag, fail

    def save_pretrained(self, folder):
        with open(os.path.join(folder, "model_index.json"), "w") as f:
            json.dump({"tag": self.tag}, f)
        if self.fail:
            raise OSError("disk full")


def write_index(folder, **index):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "model_index.json"), "w") as f:
        json.dump(index, f)
    return folder


# ---------------------------------------------------------------------------------------------- save_atomically
def test_save_atomically_writes_renames_and_leaves_nothing_beside(tmp_path):
    out = tmp_path / "pipe"
    saving.save_atomically(StubPipeline("a"), str(out), write_extra=lambda d: open(os.path.join(d, "README.md"), "w"))
    assert sorted(os.listdir(tmp_path)) == ["pipe"]
    assert sorted(os.listdir(out)) == ["README.md", "model_index.json"]
    umask = os.umask(0)
    os.umask(umask)
    assert os.stat(out).st_mode & 0o777 == 0o777 & ~umask  # an ordinary folder, not mkdtemp's private one


def test_save_atomically_refuses_then_replaces_an_existing_folder(tmp_path):
    out = tmp_path / "pipe"
    saving.save_atomically(StubPipeline("a"), str(out))
    with pytest.raises(ValueError, match="exists; pass --overwrite to replace it"):
        saving.save_atomically(StubPipeline("b"), str(out))
    assert saving.read_model_index(out) == {"tag": "a"}
    saving.save_atomically(StubPipeline("b"), str(out), overwrite=True)
    assert saving.read_model_index(out) == {"tag": "b"}
    assert sorted(os.listdir(tmp_path)) == ["pipe"]


@pytest.mark.parametrize("where", ["save_pretrained", "write_extra"])
def test_failed_save_keeps_the_old_folder_and_no_temporary_one(tmp_path, where):
    out = tmp_path / "pipe"
    saving.save_atomically(StubPipeline("old"), str(out))

    def broken_extra(folder):
        raise OSError("disk full")

    pipeline = StubPipeline("new", fail=where == "save_pretrained")
    extra = broken_extra if where == "write_extra" else None
    with pytest.raises(OSError, match="disk full"):
        saving.save_atomically(pipeline, str(out), overwrite=True, write_extra=extra)
    assert sorted(os.listdir(tmp_path)) == ["pipe"]
    assert saving.read_model_index(out) == {"tag": "old"}


# ---------------------------------------------------------------------------------------------- read_model_index
def make_cache(root, repo_id: str, refs: dict) -> str:
    """A Hub cache as huggingface_hub lays it out; `refs` maps a ref name to `(commit, model_index)`."""
    repo_dir = os.path.join(root, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    for ref, (commit, index) in refs.items():
        write_index(os.path.join(repo_dir, "snapshots", commit), **index)
        with open(os.path.join(repo_dir, "refs", ref), "w") as f:
            f.write(commit)
    return str(root)


def test_read_model_index_of_a_folder_and_of_a_cached_repo(tmp_path):
    folder = write_index(tmp_path / "folder", unet=WIENER)
    assert saving.read_model_index(folder) == {"unet": WIENER}
    cache = make_cache(tmp_path / "cache", "someone/repo", {"main": ("a" * 40, {"v": 1}), "v2": ("b" * 40, {"v": 2})})
    assert saving.read_model_index("someone/repo", cache_dir=cache, local_files_only=True) == {"v": 1}
    assert saving.read_model_index("someone/repo", revision="v2", cache_dir=cache, local_files_only=True) == {"v": 2}
    # Unreadable: left to diffusers to report.
    assert saving.read_model_index("someone/absent", cache_dir=cache, local_files_only=True) is None
    assert saving.read_model_index(tmp_path / "no" / "such" / "folder") is None
    (tmp_path / "folder" / "model_index.json").write_text("{not json")
    assert saving.read_model_index(folder) is None


# ---------------------------------------------------------------------------------------------- check_saved_version
def test_check_saved_version_of_the_same_and_older_versions(tmp_path, caplog):
    assert saving.check_saved_version(write_index(tmp_path / "same", unet=WIENER, **{saving.VERSION_KEY: INSTALLED}))
    logger = logging.getLogger(saving.__name__)
    logger.addHandler(caplog.handler)  # the CLI may have stopped the package's loggers from propagating
    try:
        with caplog.at_level(logging.INFO, logger=saving.__name__):
            older = write_index(tmp_path / "older", unet=WIENER, **{saving.VERSION_KEY: "0.0.1"})
            assert saving.check_saved_version(older) == "0.0.1"
    finally:
        logger.removeHandler(caplog.handler)
    assert f"saved by diffusers-analytic 0.0.1, with {INSTALLED}" in caplog.text
    assert saving.check_saved_version(write_index(tmp_path / "unversioned", unet=WIENER)) is None
    assert saving.check_saved_version(tmp_path / "no-such-folder") is None


@pytest.mark.parametrize(
    "index, expected",
    [
        ({saving.VERSION_KEY: "99.0.0"}, ["99.0.0", f"newer than the installed {INSTALLED}"]),
        (
            {saving.VERSION_KEY: "0.0.1", "unet": ["diffusers_analytic.models.denoiser_gone", "GoneDenoiser"]},
            ["diffusers-analytic 0.0.1", f"installed diffusers-analytic {INSTALLED}", "denoiser_gone.GoneDenoiser"],
        ),
        (
            {"unet": ["diffusers_analytic.models.denoiser_wiener", "NoSuchDenoiser"]},
            ["an unknown version of diffusers-analytic", "denoiser_wiener.NoSuchDenoiser"],
        ),
        ({saving.VERSION_KEY: "not a version"}, ["Invalid diffusers-analytic version 'not a version'"]),
    ],
)
def test_check_saved_version_refuses(tmp_path, index, expected):
    with pytest.raises(ValueError) as error:
        saving.check_saved_version(write_index(tmp_path / "folder", **index))
    for text in expected:
        assert text in str(error.value)


def test_check_saved_version_reads_the_repo_revision_asked_for(tmp_path):
    cache = make_cache(
        tmp_path,
        "someone/repo",
        {"main": ("a" * 40, {saving.VERSION_KEY: INSTALLED}), "next": ("b" * 40, {saving.VERSION_KEY: "99.0.0"})},
    )
    kwargs = {"cache_dir": cache, "local_files_only": True}
    assert saving.check_saved_version("someone/repo", kwargs) == INSTALLED
    with pytest.raises(ValueError, match="99.0.0"):
        saving.check_saved_version("someone/repo", {**kwargs, "revision": "next"})


# ---------------------------------------------------------------------------------------------- layering
def test_saving_is_a_low_layer():
    """saving.py imports only the standard library, huggingface_hub, packaging and the package version."""
    with open(saving.__file__) as f:
        tree = ast.parse(f.read())
    allowed_third_party = {"huggingface_hub", "packaging", "torch"}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.level > 0:
            assert node.level == 1 and node.module is None and [a.name for a in node.names] == ["__version__"]
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for name in names:
                top = name.split(".")[0]
                assert top in allowed_third_party or top in sys.stdlib_module_names, name


def test_write_json_replaces_the_file_whole(tmp_path):
    path = str(tmp_path / "metrics.json")
    saving.write_json({"r2": [1.0, 0.5]}, path)
    saving.write_json({"r2": [0.25]}, path)
    assert json.loads(open(path).read()) == {"r2": [0.25]}
    with pytest.raises(TypeError):
        saving.write_json({"r2": object()}, path)  # not JSON: the old file stays, no temporary file is left
    assert json.loads(open(path).read()) == {"r2": [0.25]}
    assert os.listdir(tmp_path) == ["metrics.json"]
