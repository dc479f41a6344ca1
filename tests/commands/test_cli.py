"""The `diffusers-analytic` command: `fit` then `generate` in temporary folders."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_analytic.commands.cli import main


@pytest.fixture(scope="module")
def wiener_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli") / "wiener-digits"
    assert main(["fit", "--method", "wiener", "--data", "digits", "--output-dir", str(folder)]) == 0
    return folder


def test_fit_writes_a_pipeline_folder(wiener_folder):
    assert sorted(os.listdir(wiener_folder)) == ["model_index.json", "scheduler", "unet"]
    config = json.loads((wiener_folder / "unet" / "config.json").read_text())
    assert config["_class_name"] == "WienerDenoiser" and config["sample_size"] == 8 and config["in_channels"] == 1
    # No temporary folder is left beside it.
    assert [p.name for p in wiener_folder.parent.iterdir()] == ["wiener-digits"]


def test_fit_refuses_to_overwrite_and_accepts_config_overrides(wiener_folder, tmp_path):
    assert main(["fit", "--method", "wiener", "--data", "digits", "--output-dir", str(wiener_folder)]) == 2
    out = tmp_path / "v"
    code = main(
        [
            "fit",
            "--method",
            "wiener",
            "--data",
            "faces",
            "--output-dir",
            str(out),
            "--config",
            "rank=32",
            "--config",
            "prediction_type=v_prediction",
        ]
    )
    assert code == 0
    config = json.loads((out / "unet" / "config.json").read_text())
    assert config["rank"] == 32 and config["prediction_type"] == "v_prediction" and config["sample_size"] == 25
    assert (
        main(
            [
                "fit",
                "--method",
                "wiener",
                "--data",
                "digits",
                "--output-dir",
                str(tmp_path / "x"),
                "--config",
                "bogus=1",
            ]
        )
        == 2
    )
    assert not (tmp_path / "x").exists()


def test_generate_writes_indexed_pngs_grid_and_manifest(wiener_folder, tmp_path):
    out = tmp_path / "images"
    args = ["generate", str(wiener_folder), "--num-images", "5", "--seed", "3", "--num-inference-steps", "10"]
    assert main([*args, "--batch-size", "2", "--output-dir", str(out)]) == 0
    names = sorted(os.listdir(out))
    assert names == ["000000.png", "000001.png", "000002.png", "000003.png", "000004.png", "grid.png", "manifest.json"]
    assert Image.open(out / "000000.png").size == (8, 8)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_images"] == 5 and manifest["seed"] == 3 and manifest["scheduler"] == "DDIMScheduler"

    # Image i is seeded from (seed, i): another batch size gives the same pictures.
    other = tmp_path / "other"
    assert main([*args, "--batch-size", "5", "--output-dir", str(other)]) == 0
    for i in range(5):
        a = np.asarray(Image.open(out / f"{i:06d}.png"), dtype=int)
        b = np.asarray(Image.open(other / f"{i:06d}.png"), dtype=int)
        assert np.abs(a - b).max() <= 1
    # ... and another seed gives other pictures.
    third = tmp_path / "third"
    assert main([*args[:5], "4", "--num-inference-steps", "10", "--output-dir", str(third)]) == 0
    assert not np.array_equal(np.asarray(Image.open(out / "000000.png")), np.asarray(Image.open(third / "000000.png")))


def test_generate_with_another_scheduler(wiener_folder, tmp_path):
    out = tmp_path / "euler"
    code = main(
        [
            "generate",
            str(wiener_folder),
            "--num-images",
            "2",
            "--num-inference-steps",
            "8",
            "--scheduler",
            "euler",
            "--output-dir",
            str(out),
        ]
    )
    assert code == 0
    assert json.loads((out / "manifest.json").read_text())["scheduler"] == "EulerDiscreteScheduler"


def test_bad_arguments_are_clear_errors(wiener_folder, tmp_path, capsys):
    assert main(["generate", str(wiener_folder), "--num-images", "0", "--output-dir", str(tmp_path)]) == 2
    assert main(["generate", str(wiener_folder), "--scheduler", "nope", "--output-dir", str(tmp_path)]) == 2
    assert "Unknown scheduler" in capsys.readouterr().err
    assert (
        main(["fit", "--method", "wiener", "--data", "no-such-set-or-folder", "--output-dir", str(tmp_path / "y")])
        == 2
    )


def test_python_dash_m_entry_point(wiener_folder, tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "diffusers_analytic",
            "generate",
            str(wiener_folder),
            "--num-images",
            "1",
            "--num-inference-steps",
            "4",
            "--output-dir",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert (tmp_path / "m" / "000000.png").exists()
