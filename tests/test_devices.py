"""Every denoiser, the pipeline and save/load on the device of `--device` (default cpu; `--device cuda` on a GPU
machine, as `benchmarks/gpu_check.py` runs it): each closed form against an independent float64 computation on the
CPU, samplers with three schedulers, class labels, and folders saved on one device and loaded on another."""

import math

import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler

import diffusers_analytic as da
from tests.models.patch_brute_force import els_brute_force, ls_brute_force, model_space
from tests.models.test_pca_locality import reference_mask, reference_x0

TIMESTEPS = (900, 400, 60)


@pytest.fixture(scope="module")
def fitted(digits):
    """One small fitted denoiser of every method, on the CPU (labels kept where the method stores images)."""
    data = da.ImageSet(digits.images[:200].clone(), digits.labels[:200].clone(), "digits200")
    return {
        "wiener": da.WienerDenoiser.from_dataset(data, show_progress=False),
        "optimal": da.OptimalDenoiser.from_dataset(data, chunk_size=64),
        "scfdm": da.SmoothedCFDMDenoiser.from_dataset(data, num_noise=3, smoothing_std=0.1),
        "nearest_dataset": da.NearestDatasetDenoiser.from_dataset(data, chunk_size=64),
        "pca_locality": da.PCALocalityDenoiser.from_dataset(data, mask_threshold=0.05, show_progress=False),
        "ls": da.LocalScoreDenoiser.from_dataset(data.images[:40], patch_size_schedule=3),
        "els": da.EquivariantLocalScoreDenoiser.from_dataset(data.images[:20], patch_size_schedule=3),
    }


def noisy_digits(digits, a: float, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    y = model_space(digits.images[500 : 500 + count])
    return (math.sqrt(a) * y + math.sqrt(1 - a) * torch.randn(y.shape, generator=generator, dtype=y.dtype)).float()


def float64_reference(name: str, denoiser, x: torch.Tensor, a: float) -> torch.Tensor:
    """x0_hat by the method's formula (docs/math.md) in float64 on the CPU, from the denoiser's stored statistics."""
    flat = x.double().reshape(len(x), -1)
    if name == "wiener":
        mean, vectors, values = denoiser.mean.double(), denoiser.eigvecs.double(), denoiser.eigvals.double()
        gains = math.sqrt(a) * values / (a * values + 1 - a)
        return (mean + ((flat - math.sqrt(a) * mean) @ vectors) * gains @ vectors.T).reshape(x.shape)
    images = model_space(denoiser.images).reshape(len(denoiser.images), -1)
    distances = ((flat[:, None] - math.sqrt(a) * images[None]) ** 2).sum(-1)  # [B, N]
    if name == "optimal":
        return (torch.softmax(-distances / (2 * (1 - a)), dim=1) @ images).reshape(x.shape)
    if name == "nearest_dataset":
        return images[distances.argmin(dim=1)].reshape(x.shape)
    if name == "pca_locality":
        mask = reference_mask(denoiser, a, denoiser.config.mask_threshold)
        return reference_x0(images, x, a, mask).reshape(x.shape)
    if name == "ls":
        return ls_brute_force(x, denoiser.images, a, 3, denoiser.config.padding)
    if name == "els":
        return els_brute_force(x, denoiser.images, a, 3, denoiser.config.padding, denoiser.config.boundary_aware)
    raise ValueError(name)


@pytest.mark.parametrize("name", ["wiener", "optimal", "nearest_dataset", "pca_locality", "ls", "els"])
def test_closed_forms_match_float64_on_the_device(fitted, digits, device, name):
    denoiser = fitted[name].to(device)
    try:
        for timestep in TIMESTEPS:
            a = float(denoiser.alphas_cumprod[timestep])
            x = noisy_digits(digits, a, 6, seed=timestep)
            out = denoiser.denoise(x.to(device), timestep)
            assert out.device.type == device.type and out.dtype == torch.float32
            reference = float64_reference(name, denoiser.to("cpu"), x, a)
            denoiser.to(device)
            error = ((out.cpu().double() - reference).norm() / reference.norm()).item()
            assert error <= 2e-4, (name, timestep, error)
    finally:
        fitted[name].to("cpu")


def test_smoothed_cfdm_on_the_device_equals_the_cpu(fitted, digits, device):
    # Its noise comes from the caller's CPU generators, so the device result equals the CPU one (checked against
    # float64 in tests/models/test_smoothed_cfdm.py).
    denoiser = fitted["scfdm"]
    x = noisy_digits(digits, float(denoiser.alphas_cumprod[500]), 4, seed=1)
    on_cpu = denoiser.denoise(x, 500, generator=[torch.Generator().manual_seed(i) for i in range(4)])
    on_device = denoiser.to(device).denoise(
        x.to(device), 500, generator=[torch.Generator().manual_seed(i) for i in range(4)]
    )
    denoiser.to("cpu")
    torch.testing.assert_close(on_device.cpu(), on_cpu, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", ["optimal", "nearest_dataset", "pca_locality"])
def test_class_labels_on_the_device(fitted, digits, device, name):
    # The posterior restricted to the class: the float64 formula over the images of that class (PCA locality keeps
    # the mask of all the data).
    denoiser = fitted[name].to(device)
    labels = torch.tensor([3, 3, 7, 0])
    a = float(denoiser.alphas_cumprod[200])
    x = noisy_digits(digits, a, 4, seed=2)
    out = denoiser.denoise(x.to(device), 200, class_labels=labels).cpu()
    denoiser.to("cpu")
    images = model_space(denoiser.images).reshape(len(denoiser.images), -1)
    for b, label in enumerate(labels.tolist()):
        members = images[denoiser.labels == label]
        flat = x[b : b + 1].double().reshape(1, -1)
        if name == "pca_locality":
            expected = reference_x0(members, flat, a, reference_mask(denoiser, a, denoiser.config.mask_threshold))
        else:
            distances = ((flat[:, None] - math.sqrt(a) * members[None]) ** 2).sum(-1)  # [1, n]
            weights = torch.softmax(-distances / (2 * (1 - a)), dim=1)
            expected = members[distances.argmin(dim=1)] if name == "nearest_dataset" else weights @ members
        error = ((out[b].double().reshape(1, -1) - expected).norm() / expected.norm()).item()
        assert error <= 2e-4, (name, label, error)


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, EulerDiscreteScheduler, DPMSolverMultistepScheduler])
def test_pipeline_on_the_device_equals_the_cpu(fitted, device, scheduler_class):
    denoiser = fitted["optimal"]
    scheduler = scheduler_class.from_config(DDIMScheduler().config)
    runs = []
    for where in ("cpu", device):
        pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=scheduler).to(where)
        pipe.set_progress_bar_config(disable=True)
        generator = [torch.Generator().manual_seed(i) for i in range(3)]
        runs.append(pipe(batch_size=3, num_inference_steps=8, generator=generator, output_type="pt").images.cpu())
    denoiser.to("cpu")
    torch.testing.assert_close(runs[1], runs[0], rtol=1e-3, atol=1e-3)


def test_saved_on_the_device_loads_anywhere(fitted, device, tmp_path):
    denoiser = fitted["pca_locality"].to(device)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser)
    pipe.save_pretrained(tmp_path / "pca")
    denoiser.to("cpu")
    loaded = da.AnalyticDDIMPipeline.from_pretrained(tmp_path / "pca")
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    expected = fitted["pca_locality"].denoise(x, 300)
    torch.testing.assert_close(loaded.unet.denoise(x, 300), expected, rtol=0, atol=0)
    loaded.to(device)
    torch.testing.assert_close(loaded.unet.denoise(x.to(device), 300).cpu(), expected, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("count", [200, 40])  # the D x D covariance, and the N x N Gram route (N < D = 64)
def test_fit_on_the_device_equals_the_cpu_fit(fitted, digits, device, count):
    if device.type == "mps":
        with pytest.raises(ValueError, match="float64"):
            da.WienerDenoiser.from_dataset(digits.images[:count], show_progress=False, device=device)
        return
    data = digits.images[:count]
    on_device = da.WienerDenoiser.from_dataset(data, show_progress=False, device=device)
    on_cpu = da.WienerDenoiser.from_dataset(data, show_progress=False)
    assert on_device.eigvecs.device.type == "cpu"  # returned on the CPU, like every fit
    x = noisy_digits(digits, 0.5, 4, seed=3).reshape(4, 1, 8, 8)
    for timestep in (999, 500, 10, 0):
        torch.testing.assert_close(on_device.denoise(x, timestep), on_cpu.denoise(x, timestep), rtol=1e-4, atol=1e-5)
    pca = da.PCALocalityDenoiser.from_dataset(data, mask_threshold=0.0, show_progress=False, device=device)
    torch.testing.assert_close(pca.eigvals, on_cpu.eigvals, rtol=1e-4, atol=1e-6)


def test_a_fit_refuses_mps_before_reading_data():
    with pytest.raises(ValueError, match="MPS does not support"):
        da.WienerDenoiser.from_dataset(torch.zeros(3, 1, 8, 8, dtype=torch.uint8), device="mps")
