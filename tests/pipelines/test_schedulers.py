"""
Every supported diffusers scheduler drives an analytic denoiser exactly.

Gaussian data N(mu, S) in 16 dimensions (1 x 4 x 4 images) and the Wiener denoiser (its exact score). Each scheduler,
with its sigma / spacing / zero-SNR variants, runs twice from the same generator: through `AnalyticDDIMPipeline`
and through a sampling loop in `scheduler_reference.py` whose model is the float64 Gaussian posterior written with a
linear solve. Final samples must agree per sample (float32 rounding, far below sampling noise), hence also in mean
and covariance.
"""

from __future__ import annotations

import copy
import inspect
import logging as py_logging
import math

import diffusers
import pytest
import torch
from diffusers.utils import logging as diffusers_logging

import diffusers_analytic as da
from diffusers_analytic.pipelines.pipeline_analytic_ddim import scheduler_from_denoiser
from diffusers_analytic.schedulers import (
    EDM_SCHEDULERS,
    FLOW_SCHEDULERS,
    REFUSED_SCHEDULERS,
    SCHEDULER_ALIASES,
    VP_SCHEDULERS,
    make_scheduler,
    scheduler_class_and_config,
    sigma_range,
    timestep_for_sigma,
)

from ..testing_utils import random_gaussian
from .scheduler_reference import GaussianPosterior, reference_sample

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")

SHAPE = (1, 4, 4)
BATCH = 128
STEPS = 10
# Max abs difference between pipeline and float64 reference samples, relative to max(1, max |reference|) (the data
# have scale ~1; a few sampler configurations overshoot to |x| ~ 100 by themselves at 10 steps).
ATOL = 2e-4
# A schedule covering flow matching's and EDM's noise levels: sigma_vp in [3.5e-4, 3.3e5].
WIDE_SCHEDULE = {"beta_start": 1e-7, "beta_end": 0.05}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """Tiny tensors: one thread avoids thread hand-off costs that dominate on a shared 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def gaussian():
    return random_gaussian(16, seed=5)


def wiener(gaussian, **config) -> da.WienerDenoiser:
    """A Wiener denoiser holding the exact mean and eigendecomposition of N(mu, S)."""
    mean, cov = gaussian
    denoiser = da.WienerDenoiser(sample_size=4, in_channels=1, **config)
    eigvals, eigvecs = torch.linalg.eigh(cov)
    denoiser.mean.copy_(mean.float())
    denoiser.eigvecs.copy_(eigvecs.float())
    denoiser.eigvals.copy_(eigvals.float())
    return denoiser


_SCHEDULER_CACHE = {}


def build_scheduler(class_name: str, denoiser, **config):
    """A fresh scheduler (deep copy of a cached one: KDPM2 and others compute 1000-step tables at construction)."""
    key = (class_name, repr(sorted(config.items())), repr(sorted(denoiser.config.items())))
    if key not in _SCHEDULER_CACHE:
        _SCHEDULER_CACHE[key] = _build_scheduler(class_name, denoiser, **config)
    return copy.deepcopy(_SCHEDULER_CACHE[key])


def _build_scheduler(class_name: str, denoiser, **config):
    scheduler_class = getattr(diffusers, class_name)
    accepted = inspect.signature(scheduler_class.__init__).parameters
    if class_name in FLOW_SCHEDULERS or class_name in EDM_SCHEDULERS:
        return scheduler_class(**config)
    if "clip_sample" in accepted:
        config.setdefault("clip_sample", False)  # the data leave [-1, 1]
    if class_name == "DPMSolverSDEScheduler":
        config.setdefault("noise_sampler_seed", 0)  # its Brownian tree is seeded from config, not the generator
    return scheduler_from_denoiser(denoiser, scheduler_class, **config)


def run_pipeline(denoiser, scheduler, seed=0, steps=STEPS, batch=BATCH, **kwargs) -> torch.Tensor:
    pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(seed)
    return pipe(
        batch_size=batch, num_inference_steps=steps, generator=generator, output_type="latent", **kwargs
    ).images


def kind_of(class_name: str, config: dict) -> str:
    if class_name in FLOW_SCHEDULERS or config.get("use_flow_sigmas"):
        return "flow"
    return "edm" if class_name in EDM_SCHEDULERS else "vp"


# --------------------------------------------------------------------------------------------- the case list
def _vp_cases():
    cases = []
    for name in VP_SCHEDULERS:
        accepted = inspect.signature(getattr(diffusers, name).__init__).parameters
        cases.append((name, {}, {}))
        for flag in ("use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas"):
            if flag in accepted:
                cases.append((name, {flag: True}, {}))
        if "timestep_spacing" in accepted:
            for spacing in ("linspace", "leading", "trailing"):
                if spacing != accepted["timestep_spacing"].default:
                    cases.append((name, {"timestep_spacing": spacing}, {}))
        if "rescale_betas_zero_snr" in accepted:
            zero_snr = {"rescale_betas_zero_snr": True, "prediction_type": "v_prediction"}
            if "timestep_spacing" in accepted:
                zero_snr["timestep_spacing"] = "trailing"
            cases.append((name, zero_snr, {"rescale_betas_zero_snr": True}))
    dpm = "DPMSolverMultistepScheduler"
    cases += [
        (dpm, {"algorithm_type": "dpmsolver++", "solver_order": 3}, {}),
        (dpm, {"algorithm_type": "sde-dpmsolver++"}, {}),
        (dpm, {"algorithm_type": "sde-dpmsolver++", "use_karras_sigmas": True}, {}),
        (dpm, {"algorithm_type": "dpmsolver", "final_sigmas_type": "sigma_min"}, {}),
        ("DPMSolverSinglestepScheduler", {"solver_order": 3, "use_karras_sigmas": True}, {}),
        ("UniPCMultistepScheduler", {"solver_order": 3, "use_exponential_sigmas": True}, {}),
        ("SASolverScheduler", {"algorithm_type": "noise_prediction", "use_karras_sigmas": True}, {}),
        ("DDIMScheduler", {"clip_sample": True}, {}),  # clip_sample kept as configured: both sides clip
        ("DDPMScheduler", {"variance_type": "fixed_large"}, {}),
    ]
    return cases


def _prediction_cases():
    """Scheduler prediction type x denoiser prediction type: the pipeline converts from x0_hat."""
    cases = []
    for name in ("DDIMScheduler", "EulerDiscreteScheduler", "DPMSolverMultistepScheduler", "UniPCMultistepScheduler"):
        for scheduler_type in ("epsilon", "v_prediction", "sample"):
            for denoiser_type in ("epsilon", "v_prediction", "sample"):
                if scheduler_type != "epsilon" or denoiser_type != "epsilon":
                    cases.append((name, {"prediction_type": scheduler_type}, {"prediction_type": denoiser_type}))
    return cases


def _flow_edm_cases():
    wide = dict(WIDE_SCHEDULE)
    return [
        ("FlowMatchEulerDiscreteScheduler", {}, wide),
        ("FlowMatchEulerDiscreteScheduler", {"shift": 3.0}, wide),
        ("FlowMatchEulerDiscreteScheduler", {"use_karras_sigmas": True}, wide),
        ("FlowMatchEulerDiscreteScheduler", {"stochastic_sampling": True}, wide),
        ("FlowMatchHeunDiscreteScheduler", {}, wide),
        ("DPMSolverMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, wide),
        ("UniPCMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, wide),
        ("DEISMultistepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, wide),
        ("SASolverScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, wide),
        ("DPMSolverSinglestepScheduler", {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}, wide),
        ("EDMEulerScheduler", {}, wide),
        ("EDMEulerScheduler", {"sigma_schedule": "exponential"}, wide),
        ("EDMEulerScheduler", {"prediction_type": "v_prediction"}, {**wide, "prediction_type": "v_prediction"}),
        ("EDMDPMSolverMultistepScheduler", {}, wide),
        ("EDMDPMSolverMultistepScheduler", {"solver_order": 3, "prediction_type": "v_prediction"}, wide),
    ]


CASES = _vp_cases() + _prediction_cases() + _flow_edm_cases()


def _case_id(case):
    name, config, denoiser_config = case
    parts = [name.replace("Scheduler", "")] + [f"{k}={v}" for k, v in config.items()]
    parts += [f"den.{k}={v}" for k, v in denoiser_config.items()]
    return "-".join(parts)


@pytest.mark.parametrize("case", CASES, ids=[_case_id(c) for c in CASES])
def test_sampling_matches_float64_reference(gaussian, case):
    name, config, denoiser_config = case
    denoiser = wiener(gaussian, **denoiser_config)
    scheduler = build_scheduler(name, denoiser, **config)
    kind = kind_of(name, config)

    samples = run_pipeline(denoiser, scheduler).double()
    reference_scheduler = build_scheduler(name, denoiser, **config)
    expected = reference_sample(
        GaussianPosterior(*gaussian),
        reference_scheduler,
        kind,
        BATCH,
        SHAPE,
        seed=0,
        num_inference_steps=STEPS,
        denoiser_alphas_cumprod=denoiser.alphas_cumprod,
    ).double()

    assert torch.isfinite(samples).all()
    tolerance = ATOL * max(1.0, expected.abs().max().item())
    assert (samples - expected).abs().max() < tolerance
    flat, flat_expected = samples.reshape(BATCH, -1), expected.reshape(BATCH, -1)
    assert torch.allclose(flat.mean(0), flat_expected.mean(0), atol=tolerance)
    assert torch.allclose(
        torch.cov(flat.T), torch.cov(flat_expected.T), atol=tolerance * 4 * max(1.0, flat_expected.abs().max().item())
    )


@pytest.mark.parametrize(
    "name, config",
    [
        ("DPMSolverMultistepScheduler", {"use_karras_sigmas": True}),
        ("UniPCMultistepScheduler", {}),
        ("FlowMatchEulerDiscreteScheduler", {}),
        ("EDMDPMSolverMultistepScheduler", {}),
    ],
)
def test_samples_follow_the_data_distribution(gaussian, name, config):
    """With the exact score, a good sampler reproduces N(mu, S) up to sampling noise (2000 samples, 25 steps)."""
    mean, cov = gaussian
    denoiser_config = WIDE_SCHEDULE if kind_of(name, config) != "vp" else {}
    denoiser = wiener(gaussian, **denoiser_config)
    samples = run_pipeline(denoiser, build_scheduler(name, denoiser, **config), steps=25, batch=2000)
    flat = samples.double().reshape(2000, -1)
    # standard errors: mean sqrt(lam_max / N) ~ 0.03, covariance entries sqrt(2 lam^2 / N) ~ 0.06 at lam_max ~ 2
    assert (flat.mean(0) - mean).abs().max() < 0.15
    assert (torch.cov(flat.T) - cov).abs().max() < 0.25


# --------------------------------------------------------------------------------------------- exact sigma
def _record_scheduler_x0(scheduler):
    """Wraps the scheduler so that every x0 it reconstructs from the model output is recorded."""
    recorded = []
    if hasattr(scheduler, "convert_model_output"):
        original = scheduler.convert_model_output

        def convert_model_output(*args, **kwargs):
            x0 = original(*args, **kwargs)
            recorded.append(x0.clone())
            return x0

        scheduler.convert_model_output = convert_model_output
    else:
        original_step = scheduler.step

        def step(*args, **kwargs):
            output = original_step(*args, **kwargs)
            recorded.append(output.pred_original_sample.clone())
            return output

        scheduler.step = step
    return recorded


@pytest.mark.parametrize(
    "name, config",
    [
        ("EulerDiscreteScheduler", {"use_karras_sigmas": True}),
        ("EulerAncestralDiscreteScheduler", {}),
        ("LMSDiscreteScheduler", {"use_exponential_sigmas": True}),
        ("HeunDiscreteScheduler", {"use_karras_sigmas": True}),
        ("KDPM2DiscreteScheduler", {"use_karras_sigmas": True}),
        ("KDPM2AncestralDiscreteScheduler", {"use_exponential_sigmas": True}),
        ("DPMSolverSDEScheduler", {"use_karras_sigmas": True}),
        ("DPMSolverMultistepScheduler", {"use_exponential_sigmas": True}),
        ("DPMSolverSinglestepScheduler", {"use_karras_sigmas": True}),
        ("UniPCMultistepScheduler", {"use_karras_sigmas": True}),
        ("SASolverScheduler", {"use_beta_sigmas": True}),
        ("DDIMScheduler", {}),
        ("EDMEulerScheduler", {}),
        ("EDMDPMSolverMultistepScheduler", {}),
    ],
)
def test_scheduler_reconstructs_the_denoisers_x0(gaussian, name, config):
    """
    The sigma seen by the denoiser is the scheduler's: the x0 the scheduler rebuilds from the model output (through
    its own alpha_t, sigma_t) equals the denoiser's x0_hat at every step.
    """
    denoiser = wiener(gaussian, **(WIDE_SCHEDULE if name in EDM_SCHEDULERS else {}))
    scheduler = build_scheduler(name, denoiser, **config)
    recorded = _record_scheduler_x0(scheduler)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=16,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
        return_intermediates=True,
    )
    assert len(recorded) == len(out.trajectory_x0)
    for x0_scheduler, x0_denoiser in zip(recorded, out.trajectory_x0):
        assert (x0_scheduler - x0_denoiser).abs().max() < 1e-4


def test_rounded_timesteps_show_the_noise_level_mismatch(gaussian):
    """
    DPM-Solver++ with exponential sigmas rounds t: without exact sigmas the model sees another noise level, the x0 the
    scheduler rebuilds is off, and the samples drift from the float64 reference; with exact sigmas they do not.
    """
    denoiser = wiener(gaussian)
    config = {"use_exponential_sigmas": True}
    name = "DPMSolverMultistepScheduler"
    posterior = GaussianPosterior(*gaussian)

    scheduler = build_scheduler(name, denoiser, **config)
    recorded = _record_scheduler_x0(scheduler)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(
        batch_size=16,
        num_inference_steps=STEPS,
        generator=torch.Generator().manual_seed(1),
        output_type="latent",
        return_intermediates=True,
        exact_sigmas=False,
    )
    x0_gap = max((a - b).abs().max().item() for a, b in zip(recorded, out.trajectory_x0))
    assert x0_gap > 1e-3

    expected = reference_sample(posterior, build_scheduler(name, denoiser, **config), "vp", BATCH, SHAPE, 0, STEPS)
    exact = run_pipeline(denoiser, build_scheduler(name, denoiser, **config))
    rounded = run_pipeline(denoiser, build_scheduler(name, denoiser, **config), exact_sigmas=False)
    exact_error = (exact - expected).abs().max().item()
    rounded_error = (rounded - expected).abs().max().item()
    assert exact_error < ATOL
    assert rounded_error > 2e-3 and rounded_error > 100 * exact_error

    # The rounded path is exactly what the reference gives when it evaluates the posterior at the scheduler's t.
    rounded_reference = reference_sample(
        posterior,
        build_scheduler(name, denoiser, **config),
        "vp",
        BATCH,
        SHAPE,
        0,
        STEPS,
        exact_sigmas=False,
        denoiser_alphas_cumprod=denoiser.alphas_cumprod,
    )
    assert (rounded - rounded_reference).abs().max() < ATOL


def test_timestep_for_sigma_inverts_the_log_sigma_interpolation():
    denoiser = da.WienerDenoiser(sample_size=4, in_channels=1)
    low, high = sigma_range(denoiser)
    sigmas = torch.exp(torch.empty(200, dtype=torch.float64).uniform_(math.log(low), math.log(high))).tolist()
    sigmas += [low, high, float(torch.tensor(low).nextafter(torch.tensor(1.0)))]
    for sigma in sigmas:
        t, outside = timestep_for_sigma(denoiser, sigma)
        assert not outside and 0 <= t <= 999
        alpha, beta = denoiser.alpha_prod_at(torch.tensor(t, dtype=torch.float64))
        assert math.isclose(beta.item() / alpha.item(), sigma**2, rel_tol=1e-12)
    # outside the schedule: the nearest end, flagged
    assert timestep_for_sigma(denoiser, low / 10) == (0.0, True)
    assert timestep_for_sigma(denoiser, high * 10) == (999.0, True)
    assert timestep_for_sigma(denoiser, math.inf) == (999.0, True)
    # zero terminal SNR: sigma = inf is a = 0 at t = T - 1; between the last finite sigma and inf there is no
    # fractional t, the nearest end in a is used (a < 1e-7 there: not flagged)
    zero_snr = da.WienerDenoiser(sample_size=4, in_channels=1, rescale_betas_zero_snr=True)
    assert timestep_for_sigma(zero_snr, math.inf) == (999.0, False)
    last_finite = ((1 - zero_snr.alphas_cumprod[998]) / zero_snr.alphas_cumprod[998]).sqrt().item()
    t, outside = timestep_for_sigma(zero_snr, 2 * last_finite)
    assert t in (998.0, 999.0) and not outside
    # Euler's zero-SNR substitute a = 2**-24 (sigma = 4096) lies inside the finite range: an exact fractional t
    t, outside = timestep_for_sigma(zero_snr, (1 / 2**-24 - 1) ** 0.5)
    alpha, _ = zero_snr.alpha_prod_at(torch.tensor(t, dtype=torch.float64))
    assert not outside and math.isclose(alpha.item(), 2**-24, rel_tol=1e-10)


# --------------------------------------------------------------------------------------------- timesteps
@pytest.mark.parametrize("dtype", [torch.int64, torch.float32, torch.float64])
@pytest.mark.parametrize("batched", [False, True])
def test_denoiser_accepts_timestep_dtypes_and_shapes(gaussian, dtype, batched):
    denoiser = wiener(gaussian)
    x = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(0))
    expected = denoiser(x, 500).sample
    t = torch.tensor([500, 500, 500] if batched else 500, dtype=dtype)
    assert torch.equal(denoiser(x, t).sample, expected)
    fractional = torch.tensor([250.25] * 3 if batched else 250.25, dtype=dtype)
    if dtype.is_floating_point:
        assert torch.equal(denoiser(x, fractional).sample, denoiser(x, 250.25).sample)


def test_every_scheduler_passes_valid_timesteps(gaussian):
    """
    On the rounded path (the scheduler's own t, as a UNet sees it) no VP case passes a timestep outside [0, T - 1];
    the schedulers pass 0-d int64, float32 and float64 tensors. (The exact path is run by the reference test.)
    """
    exact_sigmas = False
    seen = set()
    for name, config, denoiser_config in _vp_cases():
        denoiser = wiener(gaussian, **denoiser_config)
        original_forward = denoiser.forward

        def forward(sample, timestep, *args, _original=original_forward, **kwargs):
            t = torch.as_tensor(timestep)
            seen.add((t.dtype, t.ndim))
            assert 0 <= t.min() and t.max() <= 999
            return _original(sample, timestep, *args, **kwargs)

        denoiser.forward = forward
        samples = run_pipeline(
            denoiser, build_scheduler(name, denoiser, **config), batch=2, steps=5, exact_sigmas=exact_sigmas
        )
        assert torch.isfinite(samples).all(), (name, config)
    assert seen == {(torch.int64, 0), (torch.float32, 0), (torch.float64, 0)}


# --------------------------------------------------------------------------------------------- range and refusals
class _Capture(py_logging.Handler):
    def __init__(self):
        super().__init__()
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def test_noise_levels_outside_the_schedule_warn_and_use_the_nearest_end(gaussian):
    """Flow matching starts at s = 1 (sigma_vp = inf); the default schedule ends at sigma = 157: nearest end + warning."""
    denoiser = wiener(gaussian)
    capture = _Capture()
    logger = diffusers_logging.get_logger("diffusers_analytic.schedulers")
    logger.addHandler(capture)
    try:
        samples = run_pipeline(denoiser, build_scheduler("FlowMatchEulerDiscreteScheduler", denoiser))
    finally:
        logger.removeHandler(capture)
    assert torch.isfinite(samples).all()
    assert any("outside the denoiser's training schedule" in m and "t = 999" in m for m in capture.messages)

    capture.messages.clear()
    logger.addHandler(capture)
    try:
        run_pipeline(wiener(gaussian, **WIDE_SCHEDULE), build_scheduler("FlowMatchEulerDiscreteScheduler", denoiser))
    finally:
        logger.removeHandler(capture)
    assert capture.messages == []


@pytest.mark.parametrize(
    "name", ["LCMScheduler", "TCDScheduler", "DDIMInverseScheduler", "CMStochasticIterativeScheduler"]
)
def test_incompatible_schedulers_are_refused(gaussian, name):
    denoiser = wiener(gaussian)
    scheduler_class = getattr(diffusers, name)
    scheduler = (
        scheduler_class()
        if name == "CMStochasticIterativeScheduler"
        else scheduler_from_denoiser(denoiser, scheduler_class)
    )
    with pytest.raises(ValueError, match=name):
        da.AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser)
    pipe.scheduler = scheduler  # swapped after construction: refused at call time
    with pytest.raises(ValueError, match=REFUSED_SCHEDULERS[name].split(":")[0][:20]):
        pipe(batch_size=1, num_inference_steps=2)
    with pytest.raises(ValueError, match=name):
        make_scheduler(name, pipe.unet.config)


def test_incompatible_configurations_are_refused(gaussian):
    denoiser = wiener(gaussian)
    with pytest.raises(ValueError, match="variance_type='learned'"):
        da.AnalyticDDIMPipeline(
            unet=denoiser,
            scheduler=scheduler_from_denoiser(denoiser, diffusers.DDPMScheduler, variance_type="learned"),
        )
    with pytest.raises(ValueError, match="'sample'"):
        da.AnalyticDDIMPipeline(unet=denoiser, scheduler=diffusers.EDMEulerScheduler(prediction_type="sample"))
    with pytest.raises(ValueError, match="flow_prediction"):
        da.AnalyticDDIMPipeline(
            unet=denoiser,
            scheduler=scheduler_from_denoiser(denoiser, diffusers.UniPCMultistepScheduler, use_flow_sigmas=True),
        )
    with pytest.raises(ValueError, match="no DDPM noise schedule"):
        da.AnalyticDDIMPipeline(unet=denoiser, scheduler=_UnknownScheduler())
    with pytest.raises(ValueError, match="predictor-corrector"):
        da.AnalyticDDIMPipeline(unet=denoiser, scheduler=diffusers.ScoreSdeVeScheduler())


class _UnknownScheduler(diffusers.SchedulerMixin, diffusers.ConfigMixin):
    """A scheduler this package does not know, without a DDPM schedule."""

    @diffusers.configuration_utils.register_to_config
    def __init__(self, sigma_max: float = 10.0):
        self.sigmas = torch.tensor([sigma_max, 0.0])


def test_clip_sample_is_kept_as_configured(gaussian):
    denoiser = wiener(gaussian)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser)
    assert pipe.scheduler.config.clip_sample is True
    samples = pipe(
        batch_size=64, num_inference_steps=STEPS, output_type="latent", generator=torch.Generator().manual_seed(0)
    ).images
    assert pipe.scheduler.config.clip_sample is True
    assert samples.abs().max() <= 1.0 + 1e-6  # DDIM clips x0 to [-1, 1]; eta = 0 ends on x0


# --------------------------------------------------------------------------------------------- CLI names
def test_every_alias_and_class_name_builds_a_matching_scheduler(gaussian):
    denoiser = wiener(gaussian)
    base = scheduler_from_denoiser(denoiser).config
    for alias in SCHEDULER_ALIASES:
        scheduler = make_scheduler(alias, base)
        da.AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler)  # schedule check passes
    for name in (*VP_SCHEDULERS, *FLOW_SCHEDULERS, *EDM_SCHEDULERS):
        scheduler_class, _ = scheduler_class_and_config(name)
        assert scheduler_class is getattr(diffusers, name)
        da.AnalyticDDIMPipeline(unet=denoiser, scheduler=make_scheduler(name, base))
    assert make_scheduler("dpm++2m", base, karras=True).config.use_karras_sigmas is True
    assert make_scheduler("edm-euler", base, karras=True).config.sigma_schedule == "karras"
    with pytest.raises(ValueError, match="no Karras sigmas"):
        make_scheduler("ddim", base, karras=True)
    with pytest.raises(ValueError, match="Unknown scheduler"):
        make_scheduler("nope", base)


@pytest.mark.parametrize(
    "flags",
    [
        ["--scheduler", "dpm++2m", "--karras"],
        ["--scheduler", "flow-euler"],
        ["--scheduler", "EDMEulerScheduler"],
        ["--scheduler", "UniPCMultistepScheduler"],
    ],
)
def test_cli_generate_with_any_scheduler(gaussian, tmp_path, flags):
    import json

    from diffusers_analytic.commands.cli import main

    folder = tmp_path / "pipe"
    da.AnalyticDDIMPipeline(unet=wiener(gaussian)).save_pretrained(folder)
    out = tmp_path / "out"
    argv = ["generate", str(folder), "--num-images", "2", "--num-inference-steps", "4", "--output-dir", str(out)]
    assert main(argv + flags) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    expected = scheduler_class_and_config(flags[1])[0].__name__
    assert manifest["scheduler"] == expected
    assert sorted(p.name for p in out.glob("0*.png")) == ["000000.png", "000001.png"]
    if "--karras" in flags:
        assert manifest["scheduler_config"]["use_karras_sigmas"] is True
