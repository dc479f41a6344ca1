"""The CLI at its edges: every mistake a new user makes ends in one line on stderr, exit status 2, and nothing half
written. Two cases run the real command in a subprocess; the rest call `main([...])` in-process."""

import json
import logging
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_analytic.commands import fit
from diffusers_analytic.commands.cli import main
from diffusers_analytic.hub import push as hub_push

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def wiener(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("edges") / "wiener-digits")
    assert main(["fit", "--method", "wiener", "--data", "digits", "--output-dir", folder]) == 0
    return folder


def cli(*args: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`python -m diffusers_analytic ARGS` in a subprocess (our source tree first on the path)."""
    environment = {**os.environ, "PYTHONPATH": os.path.join(ROOT, "src"), **(env or {})}
    environment = {key: value for key, value in environment.items() if value is not None}
    return subprocess.run(
        [sys.executable, "-m", "diffusers_analytic", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=environment,
    )


def one_line_error(stderr: str, command: str) -> str:
    """The error line of a failed command; it must be a single line and there must be no traceback."""
    assert "Traceback" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith(f"diffusers-analytic {command}: error:")]
    assert len(errors) == 1, stderr[-3000:]
    return errors[0]


def generate(source: str, output_dir, *extra: str) -> int:
    args = ["generate", source, "--num-inference-steps", "2", "--output-dir", str(output_dir), *extra]
    return main(args)


def pngs(folder) -> list[str]:
    return sorted(name for name in os.listdir(folder) if name[0].isdigit())


# ---------------------------------------------------------------------------------------------- subprocess cases
def test_a_typo_of_a_builtin_fails_at_once_without_a_hub_request(tmp_path):
    result = cli("fit", "--method", "wiener", "--data", "digitz", "--output-dir", str(tmp_path / "out"))
    assert result.returncode == 2
    line = one_line_error(result.stderr, "fit")
    assert "did you mean the built-in 'digits'" in line and "Couldn't reach" not in line
    assert not (tmp_path / "out").exists()


def test_push_without_a_network_is_one_line_with_the_hint(wiener):
    unreachable = {"HF_ENDPOINT": "http://127.0.0.1:9", "HF_TOKEN": "hf_unused", "HF_HUB_OFFLINE": None}
    result = cli("push", wiener, "--repo-id", "someone/wiener-digits", env=unreachable)
    assert result.returncode == 2
    line = one_line_error(result.stderr, "push")
    assert "unreachable" in line and "HF_HUB_OFFLINE" in line


# ---------------------------------------------------------------------------------------------- in-process cases
def test_a_device_this_machine_lacks_is_one_line_naming_the_devices(wiener, tmp_path, capsys):
    import torch

    missing = "cuda" if not torch.cuda.is_available() else f"cuda:{torch.cuda.device_count()}"
    for device in (missing, "cuda:7" if not torch.cuda.is_available() else "cuda:99", "potato"):
        assert generate(wiener, tmp_path / "out", "--device", device) == 2
        line = one_line_error(capsys.readouterr().err, "generate")
        assert f"--device '{device}' is not a device of this machine" in line and "cpu" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(
    "error, hint",
    [
        (lambda: hub_push.LocalTokenNotFoundError("Token is required"), "huggingface-cli login"),
        (lambda: hub_push.OfflineModeIsEnabled("offline"), "HF_HUB_OFFLINE"),
    ],
)
def test_push_auth_and_offline_failures_name_the_fix(wiener, monkeypatch, capsys, error, hint):
    def refuse(*args, **kwargs):
        raise error()

    monkeypatch.setattr(hub_push, "create_repo", refuse)
    assert main(["push", wiener, "--repo-id", "someone/wiener-digits"]) == 2
    assert hint in one_line_error(capsys.readouterr().err, "push")


@pytest.mark.parametrize(
    "override, message",
    [("rank=abc", "`rank` of WienerDenoiser must be int or None, got 'abc'"), ("rnk=3", "no option 'rnk'")],
)
def test_bad_config_is_reported_before_the_data_pass(tmp_path, monkeypatch, capsys, override, message):
    monkeypatch.setattr(fit, "load_data", lambda args: pytest.fail("the data was read before the config was checked"))
    args = ["fit", "--method", "wiener", "--data", "digits", "--output-dir", str(tmp_path / "out")]
    assert main([*args, "--config", override]) == 2
    assert message in one_line_error(capsys.readouterr().err, "fit")
    assert not (tmp_path / "out").exists()


def test_help_shows_defaults_and_each_methods_config_keys(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["generate", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag, default in (("--num-images", 16), ("--seed", 0), ("--num-inference-steps", 50), ("--batch-size", 16)):
        assert f"{flag} {flag.upper()[2:].replace('-', '_')} " in text and f"(default: {default})" in text, flag
    with pytest.raises(SystemExit):
        main(["fit", "--method", "els", "--list-config"])
    listed = capsys.readouterr().out
    assert listed.startswith("els (EquivariantLocalScoreDenoiser):") and "boundary_aware=false" in listed
    assert "wiener" not in listed
    with pytest.raises(SystemExit):
        main(["fit", "--list-config"])
    listed = capsys.readouterr().out
    assert "rank=null" in listed and "mask_threshold=0.02" in listed and 'storage_dtype="auto"' in listed


def test_fit_device_is_checked_and_used(wiener, tmp_path, capsys):
    import torch

    from diffusers_analytic import AnalyticDDIMPipeline

    assert (
        main(
            ["fit", "--method", "optimal", "--data", "digits", "--output-dir", str(tmp_path / "o"), "--device", "cpu"]
        )
        == 2
    )
    assert "--device applies to the fits that compute (wiener, pca_locality)" in one_line_error(
        capsys.readouterr().err, "fit"
    )
    assert (
        main(
            [
                "fit",
                "--method",
                "wiener",
                "--data",
                "digits",
                "--output-dir",
                str(tmp_path / "w"),
                "--device",
                "potato",
            ]
        )
        == 2
    )
    assert "--device 'potato' is not a device of this machine" in one_line_error(capsys.readouterr().err, "fit")
    assert not (tmp_path / "o").exists() and not (tmp_path / "w").exists()
    assert (
        main(["fit", "--method", "wiener", "--data", "digits", "--output-dir", str(tmp_path / "w"), "--device", "cpu"])
        == 0
    )
    on_cpu, default = (
        AnalyticDDIMPipeline.from_pretrained(tmp_path / "w").unet,
        AnalyticDDIMPipeline.from_pretrained(wiener).unet,
    )
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(on_cpu.denoise(x, 100), default.denoise(x, 100), rtol=0, atol=0)


def test_fit_says_what_it_saved_in_plain_words(tmp_path, monkeypatch, caplog):
    monkeypatch.setattr(logging.getLogger("diffusers_analytic"), "propagate", True)
    with caplog.at_level(logging.INFO, logger="diffusers_analytic"):
        assert main(["fit", "--method", "optimal", "--data", "digits", "--output-dir", str(tmp_path / "o")]) == 0
    assert "Saved the optimal pipeline to" in caplog.text and "Saved a " not in caplog.text


def test_generate_refuses_a_folder_of_another_run_unless_told(wiener, tmp_path, capsys):
    out = tmp_path / "out"
    assert generate(wiener, out, "--num-images", "6") == 0
    (out / "notes.txt").write_text("mine")
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}

    for extra, difference in ((["--seed", "1"], "seed: 0 -> 1"), (["--num-images", "4"], "num_images: 6 -> 4")):
        assert generate(wiener, out, *extra) == 2
        line = one_line_error(capsys.readouterr().err, "generate")
        assert difference in line and "--overwrite" in line and "--skip-existing" in line
        assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before  # nothing touched

    assert generate(wiener, out, "--num-images", "6") == 0  # the same run again rewrites the same files
    assert generate(wiener, out, "--num-images", "4", "--seed", "1", "--overwrite") == 0
    assert pngs(out) == ["000000.png", "000001.png", "000002.png", "000003.png"]  # no image of the old run left
    assert json.loads((out / "manifest.json").read_text())["seed"] == 1 and (out / "notes.txt").exists()

    loose = tmp_path / "loose"
    loose.mkdir()
    Image.new("L", (8, 8)).save(loose / "000000.png")
    assert generate(wiener, loose) == 2
    assert "without a manifest.json" in one_line_error(capsys.readouterr().err, "generate")
    assert generate(wiener, loose, "--overwrite", "--skip-existing") == 2
    capsys.readouterr()


def test_skip_existing_compares_only_what_decides_the_pixels(wiener, tmp_path, capsys):
    out = tmp_path / "run"
    assert generate(wiener, out, "--num-images", "3") == 0
    os.remove(out / "000001.png")
    # The folder's own DDIM scheduler and an explicit `--scheduler ddim` differ only in diffusers' private keys.
    assert generate(wiener, out, "--num-images", "3", "--scheduler", "ddim", "--skip-existing") == 0
    assert pngs(out) == ["000000.png", "000001.png", "000002.png"]
    assert generate(wiener, out, "--num-images", "3", "--scheduler", "ddim", "--eta", "0.5", "--skip-existing") == 2
    line = one_line_error(capsys.readouterr().err, "generate")
    assert "eta: 0.0 -> 0.5" in line and "{" not in line  # the differing keys, not two whole configs
    assert generate(wiener, out, "--num-images", "3", "--scheduler", "ddim", "--karras", "--skip-existing") == 2
    capsys.readouterr()


def test_grid_enlarges_small_images_and_leaves_gaps(wiener, tmp_path):
    out = tmp_path / "grid"
    assert generate(wiener, out, "--num-images", "16") == 0
    with Image.open(out / "grid.png") as grid:
        assert grid.size == (4 * 64 + 3 * 2, 4 * 64 + 3 * 2)  # 8x8 digits at 8x, 2-pixel gaps
        tile = grid.crop((0, 0, 64, 64)).resize((8, 8), Image.Resampling.NEAREST)
        assert np.array_equal(np.asarray(tile), np.asarray(Image.open(out / "000000.png")))
        assert {grid.getpixel((64, y)) for y in range(grid.height)} == {255}  # a gap column


def test_progress_counts_images_times_steps(wiener, tmp_path, monkeypatch):
    import tqdm.auto

    real_tqdm, bars = tqdm.auto.tqdm, []

    class Recorder:
        def __init__(self, total=None, **kwargs):
            self.total, self.updates = total, []
            bars.append(self)

        def update(self, count=1):
            self.updates.append(count)

        def close(self):
            pass

    def bar(*args, **kwargs):  # generate's own bar is recorded; diffusers' loading bar stays a real one
        return Recorder(*args, **kwargs) if kwargs.get("unit") == "image-step" else real_tqdm(*args, **kwargs)

    monkeypatch.setattr(tqdm.auto, "tqdm", bar)
    args = ["--num-images", "5", "--batch-size", "2", "--num-inference-steps", "3"]
    assert generate(wiener, tmp_path / "p", *args) == 0
    (recorded,) = bars
    assert recorded.total == 5 * 3 and recorded.updates == [2, 2, 2, 2, 2, 2, 1, 1, 1]  # after every step
