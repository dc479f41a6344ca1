"""diffusers_analytic.hub: the hub_configs schema, the model card; with diffusers_analytic.saving: the package version
in saved folders, loading by repo id from a Hub cache (offline)."""

import copy
import json
import os
import shutil
import subprocess
import sys

import pytest
import yaml

import diffusers_analytic
from diffusers_analytic import AnalyticDDIMPipeline, WienerDenoiser, hub, saving
from diffusers_analytic.data import BUILTIN_DATASETS
from diffusers_analytic.registry import DENOISERS

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HUB_CONFIGS = os.path.join(REPO_ROOT, "hub_configs")
CONFIG_PATHS = hub.hub_config_paths(HUB_CONFIGS)


def raw_config(name: str = "wiener-digits.yaml") -> dict:
    with open(os.path.join(HUB_CONFIGS, name)) as f:
        return yaml.safe_load(f)


def small_config(name: str = "wiener-digits.yaml") -> hub.HubConfig:
    config = hub.load_hub_config(os.path.join(HUB_CONFIGS, name))
    config.sample = {"num_images": 4, "num_inference_steps": 5, "seed": 0}
    return config


@pytest.fixture(scope="module")
def built_digits(tmp_path_factory):
    """wiener-digits built into a folder (8x8 grey)."""
    folder = tmp_path_factory.mktemp("built") / "wiener-digits"
    hub.build(small_config("wiener-digits.yaml"), str(folder), show_progress=False)
    return folder


@pytest.fixture(scope="module")
def built_faces(tmp_path_factory):
    """wiener-faces built into a folder (25x25 grey): a second, distinguishable repo revision."""
    folder = tmp_path_factory.mktemp("built") / "wiener-faces"
    hub.build(small_config("wiener-faces.yaml"), str(folder), show_progress=False)
    return folder


# ---------------------------------------------------------------------------------------------- hub_configs
def test_hub_configs_cover_every_method_and_data_set():
    configs = [hub.load_hub_config(path) for path in CONFIG_PATHS]
    pairs = {(config.method, config.data["source"]) for config in configs}
    sources = (
        "ylecun/mnist",
        "zalando-datasets/fashion_mnist",
        "uoft-cs/cifar10",
        "korexyz/celeba-hq-256x256",
        "huggan/AFHQv2",
        "digits",
        "faces",
        "patches",
    )
    assert pairs == {(method, source) for method in hub.HUB_METHODS for source in sources}
    assert len(configs) == len(pairs)


@pytest.mark.parametrize("path", CONFIG_PATHS, ids=os.path.basename)
def test_every_hub_config_passes_the_schema(path):
    config = hub.load_hub_config(path)
    assert config.method in hub.HUB_METHODS
    # The file is named after its repo, and the repo follows the naming scheme.
    assert os.path.basename(path) == config.repo_id.split("/")[1] + ".yaml"
    slug = config.repo_id.split("/")[1][len(config.method.replace("_", "-")) + 1 :]
    assert config.repo_id == hub.default_repo_id(config.method, slug)
    assert config.paper["url"].startswith("https://") and "@" in config.paper["bibtex"]
    if config.method in DENOISERS:  # a registered class must accept every parameter
        hub.denoiser_class_for(config.method)


BUILTIN_CONFIG_PATHS = [path for path in CONFIG_PATHS if hub.load_hub_config(path).data["source"] in BUILTIN_DATASETS]


@pytest.mark.parametrize("path", BUILTIN_CONFIG_PATHS, ids=os.path.basename)
def test_every_builtin_data_config_builds_offline(path, tmp_path):
    # The whole build path (data, fit with the config's params, samples, card, save, load) on a few images.
    config = hub.load_hub_config(path)
    config.data["max_images"] = 24
    if config.data["source"] == "patches":  # 16x16 crops: a 3072 x 3072 eigendecomposition would take most of the time
        config.data["resolution"] = 16
    config.sample = {"num_images": 2, "num_inference_steps": 2, "seed": 0}
    hub.build(config, str(tmp_path / "built"), show_progress=False)
    pipe = AnalyticDDIMPipeline.from_pretrained(tmp_path / "built")
    assert type(pipe.unet) is DENOISERS[config.method] and pipe.unet.config.get("num_images", 24) == 24
    for key, value in config.params.items():
        assert pipe.unet.config[key] == value, (key, value)
    assert (tmp_path / "built" / "samples.png").exists() and (tmp_path / "built" / "README.md").exists()


def test_patch_machine_configs_use_the_authors_presets():
    by_name = {os.path.basename(path)[:-5]: hub.load_hub_config(path) for path in CONFIG_PATHS}
    presets = {"mnist": "mnist_unet", "fashion-mnist": "fashion_mnist_unet", "cifar10": "cifar10_unet"}
    for data, preset in presets.items():
        for method in ("ls", "els"):
            assert by_name[f"{method}-{data}"].params["patch_size_schedule"] == preset
    for name, config in by_name.items():
        if config.method == "els":  # the authors' networks are zero-padded: the boundary-aware machine
            assert config.params["padding"] == "zeros" and config.params["boundary_aware"] is True, name
        if config.method in ("ls", "els"):
            assert "2412.20292" in config.paper["url"], name


def test_hub_config_parameters_follow_the_reference():
    by_name = {os.path.basename(path)[:-5]: hub.load_hub_config(path) for path in CONFIG_PATHS}
    thresholds = {"mnist": 0.005, "cifar10": 0.05, "celebahq-64": 0.02, "afhqv2-64": 0.02}
    for data, threshold in thresholds.items():
        assert by_name[f"pca-locality-{data}"].params["mask_threshold"] == threshold
    for name, config in by_name.items():
        if config.method == "scfdm":
            assert config.params["num_noise"] == 10 and config.params["smoothing_std"] == 0.1, name
    assert by_name["wiener-cifar10"].data["image_column"] == "img"
    for name in ("wiener-celebahq-64", "wiener-afhqv2-64"):
        assert by_name[name].data["resolution"] == 64 and by_name[name].data["resize"] is True
    assert "2310.12395" in by_name["scfdm-cifar10"].paper["url"]
    assert "2509.09672" in by_name["pca-locality-cifar10"].paper["url"]


def test_schema_fills_defaults():
    raw = raw_config()
    del raw["sample"]
    config = hub.validate_hub_config(raw)
    assert config.sample == {"num_images": 16, "num_inference_steps": 50, "seed": 0}
    assert config.data["split"] == "train" and config.data["max_images"] is None


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda c: c.update(colour="blue"), "unknown key `colour`"),
        (lambda c: c["data"].update(resolutoin=8), "unknown key `data.resolutoin`"),
        (lambda c: c["paper"].update(doi="x"), "unknown key `paper.doi`"),
        (lambda c: c.pop("repo_id"), "missing required field `repo_id`"),
        (lambda c: c["data"].pop("resolution"), "missing required field `data.resolution`"),
        (lambda c: c["paper"].pop("bibtex"), "missing required field `paper.bibtex`"),
        (lambda c: c.update(method="diffusion_transformer"), "unknown method 'diffusion_transformer'"),
        (lambda c: c.update(params={"rnak": 3}), "takes no parameter ['rnak']"),
        (lambda c: c["data"].update(resolution="8"), "`data.resolution` must be an integer"),
        (lambda c: c["data"].update(resolution=True), "`data.resolution` must be an integer"),
        (lambda c: c["data"].update(channels=2), "`data.channels` must be 1 or 3"),
        (lambda c: c["data"].update(options={"num_images": 3}), "only for the built-in `patches` set"),
        (lambda c: c["scheduler"].update(beta_sched="linear"), "takes no config key ['beta_sched']"),
        (lambda c: c["scheduler"].update(class_name="WarpDriveScheduler"), "Unknown scheduler class_name"),
        (lambda c: c.update(repo_id="no slash here"), "must look like `org/name`"),
        (lambda c: c.update(license="other"), "`license: other` needs `license_name` and `license_link`"),
        (lambda c: c.update(references=[{"title": "x"}]), "missing required field `references[0].url`"),
        (lambda c: c.update(data=[1, 2]), "`data` must be a mapping"),
    ],
)
def test_schema_rejects_bad_configs(edit, message):
    raw = copy.deepcopy(raw_config())
    edit(raw)
    with pytest.raises(ValueError) as error:
        hub.validate_hub_config(raw, where="bad.yaml")
    assert message in str(error.value)
    assert str(error.value).startswith("bad.yaml: ")


def test_method_params_come_from_the_registered_class():
    # The class's config keywords, less the image size and the noise schedule (set from `data` and `scheduler`).
    assert hub.method_params("wiener") == ["rank"]
    assert {"temperature", "num_noise", "smoothing_std"} <= set(hub.method_params("scfdm"))
    for method in hub.HUB_METHODS:
        assert not {"sample_size", "in_channels", "beta_schedule", "prediction_type"} & set(hub.method_params(method))


def test_unregistered_method_is_a_clear_error(monkeypatch):
    monkeypatch.delitem(DENOISERS, "optimal")  # a hub method whose class this installation does not register
    with pytest.raises(ValueError, match=r"^bad.yaml: .*'optimal' is not available in this installation"):
        hub.validate_hub_config(raw_config("optimal-digits.yaml"), where="bad.yaml")
    with pytest.raises(ValueError, match=r"'optimal' is not available in this installation of diffusers-analytic"):
        hub.denoiser_class_for("optimal")


def test_load_hub_config_reports_bad_yaml(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("method: [wiener\n")
    with pytest.raises(ValueError, match="broken.yaml is not valid YAML"):
        hub.load_hub_config(path)


# ---------------------------------------------------------------------------------------------- card + versions
def test_model_card_parses_and_carries_the_metadata(built_digits):
    from huggingface_hub import ModelCard

    card = ModelCard.load(built_digits / "README.md")
    assert card.data.library_name == "diffusers"
    assert card.data.pipeline_tag == "unconditional-image-generation"
    assert card.data.license == "cc-by-4.0"
    assert {"diffusers-analytic", "wiener", "digits"} <= set(card.data.tags)
    assert card.data.datasets is None  # a built-in set is not a Hub data set
    text = card.text
    assert 'AnalyticDDIMPipeline.from_pretrained("diffusers-analytic/wiener-digits")' in text
    assert "](samples.png)" in text and (built_digits / "samples.png").is_file()
    assert "| images used | 1797 |" in text
    assert f"diffusers-analytic {diffusers_analytic.__version__}" in text
    assert "@book{wiener1949extrapolation" in text
    # The package is not on PyPI: the card says how to install it from the repository.
    assert "pip install diffusers-analytic" not in text and "not on PyPI" in text and "pip install -e" in text


def test_model_card_of_a_hub_data_set_lists_it():
    from huggingface_hub import ModelCard

    config = hub.load_hub_config(os.path.join(HUB_CONFIGS, "pca-locality-celebahq-64.yaml"))
    info = hub.BuildInfo(30000, "PCALocalityDenoiser", config.sample, "DDIMScheduler", {"diffusers-analytic": "0.1.0"})
    card = ModelCard(hub.render_model_card(config, info))
    assert card.data.datasets == ["korexyz/celeba-hq-256x256"]
    assert card.data.license == "other" and card.data.license_link.startswith("https://")
    assert "https://huggingface.co/datasets/korexyz/celeba-hq-256x256" in card.text
    assert "`mask_threshold=0.02`" in card.text and "2509.09672" in card.text
    assert "64x64, 3 channels (shorter side resized, then center-cropped)" in card.text


def test_saved_folder_records_the_version_without_a_config_warning(built_digits):
    index = json.loads((built_digits / "model_index.json").read_text())
    config = json.loads((built_digits / "unet" / "config.json").read_text())
    assert index[saving.VERSION_KEY] == config[saving.VERSION_KEY] == diffusers_analytic.__version__
    # diffusers warns about (and ignores) unexpected non-private keys only: nothing is left over here.
    init, unused, _ = WienerDenoiser.extract_init_dict(config)
    assert unused == {} and saving.VERSION_KEY not in init
    pipe = AnalyticDDIMPipeline.from_pretrained(built_digits)
    assert pipe.unet.config[saving.VERSION_KEY] == diffusers_analytic.__version__


def _copy_with_index(folder, tmp_path, **changes):
    target = tmp_path / "copy"
    shutil.copytree(folder, target)
    index = json.loads((target / "model_index.json").read_text())
    index.update(changes)
    (target / "model_index.json").write_text(json.dumps(index))
    return target


def test_folder_of_an_older_version_loads(built_digits, tmp_path):
    folder = _copy_with_index(built_digits, tmp_path, **{saving.VERSION_KEY: "0.0.1"})
    assert saving.check_saved_version(folder) == "0.0.1"
    pipe = AnalyticDDIMPipeline.from_pretrained(folder)
    assert pipe(batch_size=1, num_inference_steps=2, output_type="np").images.shape == (1, 8, 8, 1)


def test_folder_of_a_newer_version_fails_naming_both(built_digits, tmp_path):
    folder = _copy_with_index(built_digits, tmp_path, **{saving.VERSION_KEY: "99.0.0"})
    with pytest.raises(ValueError) as error:
        AnalyticDDIMPipeline.from_pretrained(folder)
    assert "99.0.0" in str(error.value) and f"installed {diffusers_analytic.__version__}" in str(error.value)


def test_folder_naming_a_missing_module_fails_naming_both_versions(built_digits, tmp_path):
    folder = _copy_with_index(
        built_digits,
        tmp_path,
        **{saving.VERSION_KEY: "0.0.1", "unet": ["diffusers_analytic.models.denoiser_gone", "GoneDenoiser"]},
    )
    with pytest.raises(ValueError) as error:
        AnalyticDDIMPipeline.from_pretrained(folder)
    message = str(error.value)
    assert (
        "diffusers-analytic 0.0.1" in message
        and f"installed diffusers-analytic {diffusers_analytic.__version__}" in message
    )
    assert "denoiser_gone.GoneDenoiser" in message


def test_folder_without_a_version_loads(built_digits, tmp_path):
    folder = _copy_with_index(built_digits, tmp_path)
    index = json.loads((folder / "model_index.json").read_text())
    del index[saving.VERSION_KEY]
    (folder / "model_index.json").write_text(json.dumps(index))
    assert saving.check_saved_version(folder) is None
    AnalyticDDIMPipeline.from_pretrained(folder)


# ---------------------------------------------------------------------------------------------- repo ids, offline
COMMIT_MAIN = "a" * 40
COMMIT_V1 = "b" * 40


def make_hub_cache(root, repo_id: str, snapshots: dict) -> str:
    """
    A Hub cache as huggingface_hub lays it out: `<root>/hub/models--org--name/snapshots/<commit>/...` and
    `refs/<name>` holding the commit. `snapshots` maps a ref name to `(commit, folder)`. Returns the cache dir.
    """
    cache = os.path.join(root, "hub")
    repo_dir = os.path.join(cache, "models--" + repo_id.replace("/", "--"))
    os.makedirs(os.path.join(repo_dir, "refs"), exist_ok=True)
    for ref, (commit, folder) in snapshots.items():
        shutil.copytree(folder, os.path.join(repo_dir, "snapshots", commit))
        with open(os.path.join(repo_dir, "refs", ref), "w") as f:
            f.write(commit)
    return cache


def test_from_pretrained_by_repo_id_from_the_cache(built_digits, built_faces, tmp_path):
    cache = make_hub_cache(
        tmp_path, "someone/wiener", {"main": (COMMIT_MAIN, built_digits), "v1": (COMMIT_V1, built_faces)}
    )
    pipe = AnalyticDDIMPipeline.from_pretrained("someone/wiener", cache_dir=cache, local_files_only=True)
    assert pipe.unet.sample_shape == (1, 8, 8)
    for revision in ("v1", COMMIT_V1):
        pipe = AnalyticDDIMPipeline.from_pretrained(
            "someone/wiener", cache_dir=cache, local_files_only=True, revision=revision, token=False
        )
        assert pipe.unet.sample_shape == (1, 25, 25)


def test_repo_id_version_check_reads_the_cache(built_digits, tmp_path):
    newer = _copy_with_index(built_digits, tmp_path, **{saving.VERSION_KEY: "99.1.0"})
    cache = make_hub_cache(tmp_path / "cache", "someone/newer", {"main": (COMMIT_MAIN, newer)})
    with pytest.raises(ValueError, match=r"saved by diffusers-analytic 99\.1\.0, newer than the installed"):
        AnalyticDDIMPipeline.from_pretrained("someone/newer", cache_dir=cache, local_files_only=True)


def test_generate_cli_with_a_repo_id_offline(built_digits, built_faces, tmp_path):
    """`generate ORG/NAME` with HF_HOME pointing at a prepared cache and HF_HUB_OFFLINE=1 (read at import time by
    huggingface_hub, hence a subprocess)."""
    home = tmp_path / "hf_home"
    make_hub_cache(home, "someone/wiener", {"main": (COMMIT_MAIN, built_digits), "v1": (COMMIT_V1, built_faces)})
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    out_main, out_v1 = tmp_path / "main", tmp_path / "v1"
    script = (
        "import sys; from diffusers_analytic.commands.cli import main; "
        f"codes = [main(['generate', 'someone/wiener', '--num-images', '2', '--num-inference-steps', '3', "
        f"'--output-dir', {str(out_main)!r}]), "
        f"main(['generate', 'someone/wiener', '--revision', 'v1', '--num-images', '2', '--num-inference-steps', '3', "
        f"'--output-dir', {str(out_v1)!r}])]; sys.exit(max(codes))"
    )
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    from PIL import Image

    assert Image.open(out_main / "000001.png").size == (8, 8)
    assert Image.open(out_v1 / "000001.png").size == (25, 25)
    assert json.loads((out_v1 / "manifest.json").read_text())["source"] == "someone/wiener"
