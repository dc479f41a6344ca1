"""`diffusers-analytic evaluate`: a folder from `generate`, or a pipeline with --num-images, against the digits."""

import json
import logging
import os

import numpy as np
import pytest
from PIL import Image

from diffusers_analytic.commands.cli import main

STEPS = ["--num-inference-steps", "10"]


@pytest.fixture(scope="module")
def optimal_run(tmp_path_factory):
    """An optimal-denoiser pipeline of the digits and 6 images that `generate` wrote from it."""
    root = tmp_path_factory.mktemp("evaluate")
    pipeline, samples = root / "optimal-digits", root / "samples"
    assert main(["fit", "--method", "optimal", "--data", "digits", "--output-dir", str(pipeline)]) == 0
    assert main(["generate", str(pipeline), "--num-images", "6", *STEPS, "--output-dir", str(samples)]) == 0
    return pipeline, samples


def read_metrics(folder) -> dict:
    return json.loads((folder / "metrics.json").read_text())


def test_evaluate_a_generated_folder(optimal_run):
    _, samples = optimal_run
    assert main(["evaluate", str(samples), "--reference", "digits"]) == 0
    out = samples / "evaluation"  # the default output folder; grid.png and manifest.json were not read as samples
    assert sorted(os.listdir(out)) == ["metrics.json", "nearest.png"]
    metrics = read_metrics(out)
    assert metrics["num_samples"] == 6 and metrics["num_reference"] == 1797
    assert metrics["memorized_fraction"] >= 0.9 and metrics["memorization_ratio"] == pytest.approx(1 / 3)
    assert metrics["nearest_distance"]["samples"]["max"] < 0.05  # PNG copies of training digits
    assert set(metrics["nearest_distance"]["reference"]) == {"mean", "median", "min", "max", "num_queries"}
    assert metrics["fd_pixels"] > 0 and "fd_features" not in metrics
    picture = Image.open(out / "nearest.png")
    assert picture.size == (4 * 64 + 8, 6 * (64 + 14))  # sample + 3 neighbours per row, 8x8 digits shown at 64 px

    # Evaluating it again does not read evaluation/nearest.png as a sample.
    assert main(["evaluate", str(samples), "--reference", "digits", "--grid-neighbors", "2"]) == 0
    assert read_metrics(out)["num_samples"] == 6


def test_evaluate_a_pipeline_generates_as_generate_does(optimal_run, tmp_path):
    pipeline, samples = optimal_run
    out = tmp_path / "from-pipeline"
    assert (
        main(
            ["evaluate", str(pipeline), "--num-images", "6", *STEPS, "--reference", "digits", "--output-dir", str(out)]
        )
        == 0
    )
    from_folder = tmp_path / "from-folder"
    assert main(["evaluate", str(samples), "--reference", "digits", "--output-dir", str(from_folder)]) == 0
    generated, written = read_metrics(out), read_metrics(from_folder)
    assert generated["seed"] == 0 and generated["num_inference_steps"] == 10
    for key in ("num_samples", "memorized_fraction", "nearest_distance", "fd_pixels"):
        assert generated[key] == written[key], key  # the same pixels


def test_samples_of_another_size_are_resized(tmp_path, caplog):
    folder = tmp_path / "big"
    folder.mkdir()
    generator = np.random.default_rng(0)
    for i in range(4):
        Image.fromarray(generator.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(folder / f"{i:06d}.png")
    out = tmp_path / "out"
    logger = logging.getLogger("diffusers_analytic.commands.evaluate")
    logger.addHandler(caplog.handler)  # the CLI may have stopped the package's loggers from propagating
    try:
        args = ["evaluate", str(folder), "--reference", "digits", "--output-dir", str(out), "--num-images", "3"]
        assert main(args) == 0
    finally:
        logger.removeHandler(caplog.handler)
    assert "16x16 RGB differ from the reference's 8x8" in caplog.text
    metrics = read_metrics(out)
    assert metrics["num_samples"] == 3 and metrics["memorized_fraction"] == 0.0


def test_feature_model_from_a_local_folder(optimal_run, tmp_path):
    pytest.importorskip("transformers")
    from tests.evaluation.test_features import save_tiny_encoder

    _, samples = optimal_run
    model = save_tiny_encoder(tmp_path / "tiny-dinov2")
    out = tmp_path / "features"
    args = ["evaluate", str(samples), "--reference", "digits", "--feature-model", model, "--output-dir", str(out)]
    assert main([*args, "--max-reference-queries", "50"]) == 0
    metrics = read_metrics(out)
    assert metrics["feature_model"] == model and metrics["fd_features"] > 0
    assert 0.0 <= metrics["memorized_fraction_features"] <= 1.0
    assert metrics["nearest_distance"]["reference"]["num_queries"] == 50


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert err and err[-1].startswith("diffusers-analytic evaluate: error: "), err
    return err[-1]


def test_bad_input_is_one_line_and_exit_code_2(optimal_run, tmp_path, capsys):
    pipeline, samples = optimal_run
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "manifest.json").write_text("{}")
    (empty / "grid.png").write_bytes(b"")
    assert main(["evaluate", str(empty), "--reference", "digits"]) == 2
    assert "has no sample images" in error_line(capsys)

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "000000.png").write_bytes(b"not a png")
    assert main(["evaluate", str(broken), "--reference", "digits"]) == 2
    line = error_line(capsys)
    assert "Cannot read" in line and "000000.png" in line

    assert main(["evaluate", str(tmp_path / "missing"), "--reference", "digits"]) == 2
    assert "neither a folder" in error_line(capsys)
    assert main(["evaluate", str(pipeline), "--reference", "digits", "--output-dir", str(tmp_path / "o")]) == 2
    assert "--num-images" in error_line(capsys)
    assert main(["evaluate", str(samples), "--reference", "no-such-set-or-folder", "--output-dir", str(tmp_path)]) == 2
    error_line(capsys)
    bad_model = str(tmp_path / "no-model")
    args = ["evaluate", str(samples), "--reference", "digits", "--feature-model", bad_model]
    assert main([*args, "--output-dir", str(tmp_path / "f")]) == 2
    line = error_line(capsys)
    assert "feature model" in line and ("transformers" in line or "facebook/dinov2-base" in line)
    assert not (tmp_path / "f").exists()
    assert main(["evaluate", str(samples), "--reference", "digits", "--ratio", "2"]) == 2
    assert "--ratio" in error_line(capsys)
