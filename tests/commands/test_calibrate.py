"""`diffusers-analytic calibrate`: an ELS machine calibrated against another ELS machine with a known schedule (playing
the trained model) gets that schedule back in a new pipeline folder. The calibration itself is tested in
tests/evaluation/test_calibration.py."""

import json
import os
import subprocess
import sys

import pytest
import torch

import diffusers_analytic as da
from diffusers_analytic.commands.calibrate import parse_candidates
from diffusers_analytic.commands.cli import main


def test_cli_writes_the_schedule_into_a_new_pipeline(machines, tmp_path, capsys):
    trained, machine = machines
    da.AnalyticDDIMPipeline(unet=trained).save_pretrained(tmp_path / "trained")
    da.AnalyticDDIMPipeline(unet=machine).save_pretrained(tmp_path / "machine")
    out = tmp_path / "calibrated"
    command = [
        sys.executable,
        "-m",
        "diffusers_analytic",
        "calibrate",
        str(tmp_path / "machine"),
        str(tmp_path / "trained"),
        "--output-dir",
        str(out),
        "--candidates",
        "1,3,5",
        "--num-samples",
        "2",
        "--num-inference-steps",
        "6",
    ]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    calibrated = da.AnalyticDDIMPipeline.from_pretrained(out).unet
    report = json.loads((out / "calibration.json").read_text())
    assert calibrated.config.patch_size_schedule == report["patch_size_schedule"]
    assert [calibrated.patch_size_at(t)[0] for t in report["timesteps"]] == [
        trained.patch_size_at(t)[0] for t in report["timesteps"]
    ]
    assert torch.equal(calibrated.images, machine.images)
    # The source folder is untouched, and an existing output needs --overwrite.
    assert da.AnalyticDDIMPipeline.from_pretrained(tmp_path / "machine").unet.config.patch_size_schedule == 7
    before = (out / "calibration.json").read_text()
    assert main(command[3:]) == 2 and "--overwrite" in capsys.readouterr().err
    assert (out / "calibration.json").read_text() == before


def test_bad_candidates_are_clear_errors(tmp_path, capsys):
    with pytest.raises(ValueError, match="odd positive"):
        parse_candidates("3,4")
    assert parse_candidates(" 5,3,5 ") == [3, 5]
    code = main(["calibrate", "m", "t", "--output-dir", str(tmp_path / "o"), "--candidates", "0"])
    assert code == 2 and "odd positive" in capsys.readouterr().err
    assert main(["calibrate", "m", "t", "--output-dir", str(tmp_path / "o"), "--num-samples", "0"]) == 2
    assert "must be positive" in capsys.readouterr().err
