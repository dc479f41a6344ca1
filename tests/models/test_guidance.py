"""Classifier-free guidance with closed-form denoisers: eps = eps_all + w (eps_class - eps_all), checked against a
float64 computation of both posteriors on a two-class Gaussian mixture, and its limits w = 0 and w = 1."""

import json
import math

import pytest
import torch

import diffusers_analytic as da
from diffusers_analytic.commands.cli import main
from diffusers_analytic.kernels import empirical_cpu


@pytest.fixture(scope="module")
def mixture():
    """400 draws of a two-class Gaussian mixture in D = 16 (4x4 images), class means -0.4 and +0.4, std 0.15."""
    generator = torch.Generator().manual_seed(0)
    labels = torch.arange(400) % 2
    means = torch.where(labels[:, None] == 0, -0.4, 0.4) + 0.1 * torch.randn(400, 16, generator=generator).sign()
    images = (means + 0.15 * torch.randn(400, 16, generator=generator)).clamp(-1, 1)
    return da.ImageSet(images.reshape(400, 1, 4, 4), labels, "mixture")


def float64_guided(x, a, images, labels, classes, w):
    """x0_all + w (x0_class - x0_all) in float64: softmax_i(-||x - sqrt(a) y_i||^2 / (2 (1 - a))) over all / the class."""
    x, y = x.double().reshape(len(x), -1), images.double().reshape(len(images), -1)
    logits = -((x[:, None] - math.sqrt(a) * y[None]) ** 2).sum(-1) / (2 * (1 - a))  # [B, N]
    x0_all = torch.softmax(logits, dim=1) @ y
    in_class = labels[None, :] == classes[:, None]
    x0_class = torch.softmax(logits.masked_fill(~in_class, float("-inf")), dim=1) @ y
    return x0_all + w * (x0_class - x0_all)


@pytest.mark.parametrize("w", [0.0, 0.5, 1.0, 3.0])
@pytest.mark.parametrize("timestep", [800, 300, 50])
def test_optimal_guidance_matches_float64(mixture, w, timestep):
    denoiser = da.OptimalDenoiser.from_dataset(mixture, chunk_size=64)
    a = float(denoiser.alphas_cumprod[timestep])
    x = torch.randn(6, 1, 4, 4, generator=torch.Generator().manual_seed(timestep))
    classes = torch.tensor([0, 1, 0, 1, 1, 0])
    out = denoiser(x, timestep, class_labels=classes, guidance_scale=w)
    expected = float64_guided(x, a, mixture.images, mixture.labels, classes, w)
    error = ((out.pred_original_sample.double().reshape(6, -1) - expected).norm() / expected.norm()).item()
    assert error <= 1e-5, error
    # the epsilon the scheduler gets is the same combination of epsilons
    eps = (x.double().reshape(6, -1) - math.sqrt(a) * expected) / math.sqrt(1 - a)
    torch.testing.assert_close(out.sample.double().reshape(6, -1), eps, rtol=1e-4, atol=1e-4)


def test_guidance_one_and_zero_are_the_conditional_and_unconditional_results(mixture):
    denoiser = da.OptimalDenoiser.from_dataset(mixture)
    x, classes = torch.randn(4, 1, 4, 4, generator=torch.Generator().manual_seed(1)), torch.tensor([1, 0, 1, 0])
    conditional = denoiser.denoise(x, 400, class_labels=classes)
    assert torch.equal(denoiser.denoise(x, 400, class_labels=classes, guidance_scale=1.0), conditional)
    assert torch.equal(denoiser.denoise(x, 400, class_labels=classes, guidance_scale=0), denoiser.denoise(x, 400))


@pytest.mark.parametrize("method", ["optimal", "nearest_dataset"])
def test_guidance_is_one_pass_over_the_images(mixture, monkeypatch, method):
    calls = []
    nearest, softmax = empirical_cpu.nearest_state, empirical_cpu.softmax_state
    monkeypatch.setattr(empirical_cpu, "softmax_state", lambda *a: calls.append(len(a[0])) or softmax(*a))
    monkeypatch.setattr(empirical_cpu, "nearest_state", lambda *a: calls.append(len(a[0])) or nearest(*a))
    denoiser = da.get_denoiser_class(method).from_dataset(mixture)
    x, classes = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2)), torch.tensor([0, 1, 1])
    guided = denoiser.denoise(x, 200, class_labels=classes, guidance_scale=2.0)
    assert calls == [6]  # one pass, the unconditional and the conditional rows together
    x0_all, x0_class = denoiser.denoise(x, 200), denoiser.denoise(x, 200, class_labels=classes)
    torch.testing.assert_close(guided, x0_all + 2.0 * (x0_class - x0_all), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["scfdm", "pca_locality", "ls", "els"])
def test_guidance_of_the_other_methods_combines_their_two_posteriors(mixture, method):
    config = {"patch_size_schedule": 3} if method in ("ls", "els") else {}
    denoiser = da.get_denoiser_class(method).from_dataset(mixture, **config)
    x, classes = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(3)), torch.tensor([1, 0, 1])
    seeds = lambda: [torch.Generator().manual_seed(i) for i in range(3)]  # noqa: E731
    generators = seeds()
    guided = denoiser.denoise(x, 300, generator=generators, class_labels=classes, guidance_scale=-0.5)
    x0_class = denoiser.denoise(x, 300, generator=seeds(), class_labels=classes)
    x0_all = denoiser.denoise(x, 300, generator=seeds())
    torch.testing.assert_close(guided, x0_all - 0.5 * (x0_class - x0_all), rtol=1e-5, atol=1e-6)
    # the generators end where one call leaves them (the second term replays the first's draws)
    reference = seeds()
    denoiser.denoise(x, 300, generator=reference, class_labels=classes)
    assert all(torch.equal(g.get_state(), r.get_state()) for g, r in zip(generators, reference))


def test_guidance_needs_class_labels_and_a_finite_scale(mixture):
    denoiser = da.OptimalDenoiser.from_dataset(mixture)
    x = torch.randn(2, 1, 4, 4)
    with pytest.raises(ValueError, match="needs `class_labels`"):
        denoiser.denoise(x, 100, guidance_scale=2.0)
    with pytest.raises(ValueError, match="finite"):
        denoiser.denoise(x, 100, class_labels=[0, 1], guidance_scale=float("nan"))


def test_pipeline_guidance(mixture):
    denoiser = da.OptimalDenoiser.from_dataset(mixture)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser)
    pipe.set_progress_bar_config(disable=True)

    def run(**kwargs):
        generator = [torch.Generator().manual_seed(i) for i in range(4)]
        return pipe(batch_size=4, num_inference_steps=10, generator=generator, output_type="pt", **kwargs).images

    conditional = run(class_labels=[0, 1, 0, 1])
    assert torch.equal(run(class_labels=[0, 1, 0, 1], guidance_scale=1.0), conditional)
    guided = run(class_labels=[0, 1, 0, 1], guidance_scale=4.0)
    assert guided.shape == conditional.shape and torch.isfinite(guided).all()
    assert not torch.equal(guided, conditional)


def test_generate_with_guidance_on_the_command_line(digits_small, tmp_path):
    pipe = da.AnalyticDDIMPipeline(unet=da.OptimalDenoiser.from_dataset(digits_small))
    pipe.save_pretrained(tmp_path / "optimal")
    out = tmp_path / "samples"
    common = ["generate", str(tmp_path / "optimal"), "--num-images", "2", "--num-inference-steps", "5"]
    assert main([*common, "--class-label", "3", "--guidance-scale", "2.5", "--output-dir", str(out)]) == 0
    assert json.loads((out / "manifest.json").read_text())["guidance_scale"] == 2.5
    assert (out / "000001.png").is_file()
    assert main([*common, "--guidance-scale", "2.5", "--output-dir", str(tmp_path / "none")]) == 2  # no class
