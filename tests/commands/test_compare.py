"""`diffusers-analytic compare` end to end: a tiny random UNet2DModel saved as a DDPMPipeline vs a Wiener pipeline."""

import json
import os

import numpy as np
import pytest
import torch
from diffusers import DDPMPipeline, DDPMScheduler, UNet2DModel
from PIL import Image

from diffusers_analytic import AnalyticDDIMPipeline, WienerDenoiser, load_builtin
from diffusers_analytic.commands.cli import main
from diffusers_analytic.utils.seeding import generator_for_index
from tests.testing_utils import tiny_unet


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("compare")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler()).save_pretrained(root / "trained")
    DDPMPipeline(unet=tiny_unet(), scheduler=DDPMScheduler(beta_schedule="squaredcos_cap_v2")).save_pretrained(
        root / "trained-cosine"
    )
    denoiser = WienerDenoiser.from_dataset(load_builtin("digits").images, show_progress=False)
    AnalyticDDIMPipeline(unet=denoiser).save_pretrained(root / "wiener")
    return root


def test_compare_end_to_end(folders, tmp_path):
    out = tmp_path / "out"
    code = main(
        [
            "compare",
            str(folders / "wiener"),
            str(folders / "trained"),
            "--output-dir",
            str(out),
            "--num-inference-steps",
            "4",
            "--num-samples",
            "5",
            "--batch-size",
            "3",
            "--grid-samples",
            "3",
            "--seed",
            "11",
            "--device",
            "cpu",
        ]
    )
    assert code == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["timesteps"] == [750, 500, 250, 0]
    assert metrics["num_samples"] == 5 and metrics["seed"] == 11
    for key in ("single_step", "own_trajectory"):
        assert metrics[key]["timesteps"] == [750, 500, 250, 0]
        for name in ("r2_mean", "r2_std", "mse_mean", "mse_std"):
            assert len(metrics[key][name]) == 4 and np.isfinite(metrics[key][name]).all()
    assert np.isfinite(metrics["final_sample"]["r2_mean"])

    # The first step's x_t is the initial noise of (seed, i): recompute its single-step R^2 / MSE independently.
    unet = UNet2DModel.from_pretrained(folders / "trained", subfolder="unet")
    denoiser = AnalyticDDIMPipeline.from_pretrained(folders / "wiener").unet
    alpha = DDPMScheduler().alphas_cumprod[750].double()
    x_t = torch.stack([torch.randn((1, 8, 8), generator=generator_for_index(11, i)) for i in range(5)])
    with torch.no_grad():
        eps = unet(x_t, 750).sample.double()
    trained_x0 = ((x_t.double() - (1 - alpha).sqrt() * eps) / alpha.sqrt()).reshape(5, -1).numpy()
    analytic_x0 = denoiser.denoise(x_t, 750).double().reshape(5, -1).numpy()
    ss_res = ((analytic_x0 - trained_x0) ** 2).sum(1)
    ss_tot = trained_x0.var(1) * trained_x0.shape[1]
    assert metrics["single_step"]["r2_mean"][0] == pytest.approx(np.mean(1 - ss_res / ss_tot), rel=1e-4)
    assert metrics["single_step"]["mse_mean"][0] == pytest.approx(np.mean(ss_res / 64), rel=1e-4)
    # A random network is no Wiener filter: the score says so.
    assert metrics["single_step"]["r2_mean"][0] < 0.5

    with Image.open(out / "r2_per_step.png") as plot:
        assert plot.format == "PNG" and plot.width > 300
    with Image.open(out / "grid_final.png") as grid:  # 2 rows (trained, analytic) x 3 samples, 8x8 shown at 64x64
        assert grid.size == (3 * 64, 2 * 64)
    for name in ("grid_single_step.png", "grid_own_trajectory.png"):  # 2 rows per sample, one column per step
        with Image.open(out / name) as grid:
            assert grid.size == (4 * 64, 6 * 64)
    assert not [name for name in os.listdir(out) if ".tmp" in name]


def test_compare_rejects_a_different_noise_schedule(folders, tmp_path, capsys):
    out = tmp_path / "out"
    code = main(
        [
            "compare",
            str(folders / "wiener"),
            str(folders / "trained-cosine"),
            "--output-dir",
            str(out),
            "--num-inference-steps",
            "2",
            "--num-samples",
            "1",
            "--device",
            "cpu",
        ]
    )
    assert code == 2
    error = capsys.readouterr().err
    assert "share one noise schedule" in error and "squaredcos_cap_v2" in error
    assert not out.exists()


def test_compare_two_analytic_pipelines(folders, tmp_path):
    # An analytic folder as TRAINED: compared with itself, R^2 = 1 at every step.
    out = tmp_path / "out"
    code = main(
        [
            "compare",
            str(folders / "wiener"),
            str(folders / "wiener"),
            "--output-dir",
            str(out),
            "--num-inference-steps",
            "3",
            "--num-samples",
            "2",
            "--device",
            "cpu",
        ]
    )
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["trained_model"] == "WienerDenoiser"
    for key in ("single_step", "own_trajectory"):
        assert metrics[key]["r2_mean"] == pytest.approx([1.0] * 3, abs=1e-4)


def test_compare_rejects_bad_counts(folders, tmp_path, capsys):
    code = main(
        [
            "compare",
            str(folders / "wiener"),
            str(folders / "trained"),
            "--output-dir",
            str(tmp_path / "o"),
            "--num-samples",
            "0",
        ]
    )
    assert code == 2
    assert "must be positive" in capsys.readouterr().err
