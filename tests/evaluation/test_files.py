"""Loading the trained pipeline to compare with (diffusers_analytic.evaluation.files)."""

import types

import pytest
import torch
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel

from diffusers_analytic import AnalyticDDIMPipeline, WienerDenoiser
from diffusers_analytic.evaluation import files, load_trained
from tests.testing_utils import tiny_unet


def test_load_trained_reads_a_diffusers_and_an_analytic_folder(wiener, tmp_path):
    unet = tiny_unet()
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
