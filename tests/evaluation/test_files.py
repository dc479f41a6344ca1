"""Loading the trained pipeline to compare with (diffusers_analytic.evaluation.files)."""

import types

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_analytic import AnalyticDDIMPipeline, WienerDenoiser
from diffusers_analytic.evaluation import files, load_trained


def test_load_trained_reads_a_diffusers_and_an_analytic_folder(wiener, tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    )
    DDPMPipeline(unet=unet, scheduler=DDPMScheduler()).save_pretrained(tmp_path / "trained")
    loaded, scheduler = load_trained(str(tmp_path / "trained"))
    assert isinstance(loaded, UNet2DModel) and isinstance(scheduler, DDPMScheduler)
    torch.testing.assert_close(loaded.conv_in.weight, unet.conv_in.weight)

    AnalyticDDIMPipeline(unet=wiener).save_pretrained(tmp_path / "wiener")
    loaded, scheduler = load_trained(tmp_path / "wiener")
    assert isinstance(loaded, WienerDenoiser) and isinstance(scheduler, DDIMScheduler)
    assert torch.equal(loaded.mean, wiener.mean)


def test_load_trained_needs_a_unet_and_a_scheduler(monkeypatch, tmp_path):
    class NoUnet:
        @staticmethod
        def from_pretrained(source, **kwargs):
            return types.SimpleNamespace(scheduler=DDPMScheduler())

    monkeypatch.setattr(files, "DiffusionPipeline", NoUnet)
    with pytest.raises(ValueError, match="without a `unet` and a `scheduler`"):
        load_trained(str(tmp_path / "anything"))
