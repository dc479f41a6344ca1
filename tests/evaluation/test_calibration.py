"""Calibration of the patch-size schedule: an ELS machine calibrated against another ELS machine with a known schedule
(playing the trained model) gets that schedule back (diffusers_analytic.evaluation.calibration)."""

import pytest
from diffusers import DDIMScheduler

import diffusers_analytic as da
from diffusers_analytic.evaluation import calibrate_patch_sizes


def test_recovers_a_known_schedule(machines):
    trained, machine = machines
    calibration = calibrate_patch_sizes(
        machine, trained, DDIMScheduler(), [1, 3, 5, 7], num_samples=3, num_inference_steps=8, show_progress=False
    )
    timesteps = calibration.timesteps
    expected = [trained.patch_size_at(t)[0] for t in timesteps]
    assert calibration.patch_sizes == expected and len(set(expected)) == 3
    assert calibration.candidates == [1, 3, 5, 7] and len(calibration.log_snrs) == len(timesteps)
    for step, k in enumerate(expected):  # the true size predicts the trained model (to rounding), the others not
        assert calibration.median_r2[k][step] > 1 - 1e-6
        assert all(calibration.median_r2[j][step] < calibration.median_r2[k][step] for j in (1, 3, 5, 7) if j != k)
    report = calibration.to_dict()
    assert report["patch_size_schedule"] == calibration.schedule and set(report["median_r2"]) == {"1", "3", "5", "7"}
    machine.set_patch_size_schedule(calibration.schedule)
    try:
        assert [machine.patch_size_at(t)[0] for t in timesteps] == expected
    finally:
        machine.set_patch_size_schedule(7)


def test_bad_arguments_are_clear_errors(machines):
    wiener = da.WienerDenoiser(sample_size=8, in_channels=1)
    with pytest.raises(ValueError, match="LS or ELS"):
        calibrate_patch_sizes(wiener, machines[0], DDIMScheduler(), [3], show_progress=False)
    with pytest.raises(ValueError, match="at least one patch size"):
        calibrate_patch_sizes(machines[1], machines[0], DDIMScheduler(), [], show_progress=False)
    with pytest.raises(ValueError, match="noise schedule"):
        calibrate_patch_sizes(machines[1], machines[0], DDIMScheduler(beta_end=0.03), [3], show_progress=False)
    with pytest.raises(ValueError, match=r"shape \[3, 8, 8\].*\[1, 8, 8\]"):
        colour = da.WienerDenoiser(sample_size=8, in_channels=3)
        calibrate_patch_sizes(machines[1], colour, DDIMScheduler(), [3], show_progress=False)
