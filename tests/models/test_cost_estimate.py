"""Every denoiser estimates the work of a call, and the pipeline warns before a run that would take long."""

import torch

import diffusers_analytic as da
from diffusers_analytic.pipelines import pipeline_analytic_ddim
from tests.testing_utils import logged_warnings


def test_counts_follow_the_closed_forms(digits_small):
    optimal = da.OptimalDenoiser.from_dataset(digits_small)
    assert optimal.estimated_flops(8) == 4 * 8 * 300 * 64
    wiener = da.WienerDenoiser.from_dataset(digits_small, show_progress=False, rank=10)
    assert wiener.estimated_flops(8) == 4 * 8 * 64 * 10
    els = da.EquivariantLocalScoreDenoiser.from_dataset(
        digits_small.images[:20], patch_size_schedule=[[0.0, 3], [-2.0, 5]]
    )
    assert els.estimated_flops(2) == 2 * 2 * 20 * 64**2 * 1 * 5 * 5


def test_a_long_run_is_announced_before_it_starts(digits_small, monkeypatch):
    denoiser = da.OptimalDenoiser.from_dataset(digits_small)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser)
    pipe.set_progress_bar_config(disable=True)
    with logged_warnings(pipeline_analytic_ddim.__name__) as records:
        pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
        assert not records  # 3 calls of 4 * 2 * 300 * 64 flops: short
        monkeypatch.setattr(pipeline_analytic_ddim, "LONG_RUN_FLOPS", 1e5)
        pipe(batch_size=2, num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert len(records) == 1
    message = records[0].getMessage()
    assert "3 denoiser calls" in message and "OptimalDenoiser" in message and "min at 100 GFLOP/s" in message


def test_a_long_single_call_is_announced(digits_small, monkeypatch):
    from diffusers_analytic.models import modeling_analytic

    denoiser = da.WienerDenoiser.from_dataset(digits_small, show_progress=False)
    with logged_warnings(modeling_analytic.__name__) as records:
        x = torch.randn(3, 1, 8, 8)
        denoiser.denoise(x, 500)
        assert not records
        monkeypatch.setattr(modeling_analytic, "LONG_RUN_FLOPS", denoiser.estimated_flops(3))
        denoiser.denoise(x, 500)
        denoiser(x, 500)  # forward too
    assert len(records) == 2
    message = records[0].getMessage()
    assert "One WienerDenoiser call on 3 samples" in message and "min at 100 GFLOP/s" in message


def test_elementwise_methods_are_announced_at_their_share_of_the_gemm_rate(digits_small, monkeypatch):
    from diffusers_analytic.models import modeling_analytic

    denoiser = da.LocalScoreDenoiser.from_dataset(digits_small.images[:20], patch_size_schedule=3)
    flops = denoiser.estimated_flops(2)
    # above the threshold only once divided by LS's share of the GEMM rate
    monkeypatch.setattr(modeling_analytic, "LONG_RUN_FLOPS", 0.5 * flops / denoiser.gemm_rate_fraction)
    with logged_warnings(modeling_analytic.__name__) as records:
        denoiser.denoise(torch.randn(2, 1, 8, 8), 500)
    assert len(records) == 1
    assert "3% of the GEMM rate" in records[0].getMessage() and "at 3 GFLOP/s" in records[0].getMessage()
