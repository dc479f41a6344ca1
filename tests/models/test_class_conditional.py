"""Class-conditional generation with the data-holding denoisers: the posterior restricted to the requested class."""

import json

import pytest
import torch
from diffusers import DDIMScheduler
from diffusers.utils import logging

import diffusers_analytic as da
from diffusers_analytic.commands.cli import main

METHODS = [
    (da.OptimalDenoiser, {}),
    (da.SmoothedCFDMDenoiser, {"num_noise": 2, "smoothing_std": 0.05}),
    (da.NearestDatasetDenoiser, {}),
]


@pytest.fixture(scope="module")
def digits():
    full = da.load_builtin("digits")
    return da.ImageSet(full.images[:300], full.labels[:300], "digits300")


def test_labels_are_stored(digits):
    denoiser = da.OptimalDenoiser.from_dataset(digits)
    assert denoiser.config.has_labels and torch.equal(denoiser.labels, digits.labels)
    assert denoiser._known_labels().tolist() == list(range(10))
    tensor_labels = da.OptimalDenoiser.from_dataset(digits.images, labels=digits.labels)
    assert torch.equal(tensor_labels.labels, digits.labels)


def test_optimal_posterior_restricted_to_the_class(digits):
    denoiser = da.OptimalDenoiser.from_dataset(digits, chunk_size=37)
    y = digits.images.double().reshape(300, -1) / 127.5 - 1
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([3, 3, 7, 0])
    for timestep in (900, 300, 50):
        out = denoiser.denoise(x, timestep, class_labels=labels).double().reshape(4, -1)
        a = denoiser.alphas_cumprod[timestep]
        for b in range(4):
            members = y[digits.labels == labels[b]]
            distances = ((x[b].double().reshape(-1) - a.sqrt() * members) ** 2).sum(-1)
            ref = torch.softmax(-distances / (2 * (1 - a)), 0) @ members
            assert ((out[b] - ref).norm() / ref.norm()) <= 1e-4


def test_top_k_restricted_to_the_class(digits):
    exact = da.OptimalDenoiser.from_dataset(digits)
    top_k = da.OptimalDenoiser.from_dataset(digits, num_neighbors=300)  # k larger than any class: all its images
    x = torch.randn(3, 1, 8, 8)
    labels = [1, 5, 5]
    torch.testing.assert_close(
        top_k.denoise(x, 400, class_labels=labels), exact.denoise(x, 400, class_labels=labels), atol=1e-5, rtol=1e-5
    )


@pytest.mark.parametrize("cls, config", METHODS, ids=lambda value: getattr(value, "__name__", ""))
def test_samples_are_nearest_to_an_image_of_the_requested_class(digits, cls, config):
    denoiser = cls.from_dataset(digits, **config)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=DDIMScheduler())
    labels = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9])
    samples = pipe(
        batch_size=10,
        num_inference_steps=20,
        generator=torch.Generator().manual_seed(0),
        output_type="pt",
        class_labels=labels,
    ).images
    samples = samples.double().reshape(10, -1) * 2 - 1
    y = digits.images.double().reshape(300, -1) / 127.5 - 1
    nearest = ((samples[:, None] - y[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(digits.labels[nearest], labels)


@pytest.mark.parametrize("cls, config", METHODS, ids=lambda value: getattr(value, "__name__", ""))
def test_bad_labels(digits, cls, config):
    labelled = cls.from_dataset(digits, **config)
    with pytest.raises(ValueError, match="Unknown class labels"):
        labelled.denoise(torch.randn(2, 1, 8, 8), 10, class_labels=[3, 11])
    unlabelled = cls.from_dataset(digits.images, **config)
    assert not unlabelled.config.has_labels and unlabelled.labels is None
    with pytest.raises(ValueError, match="without labels"):
        unlabelled.denoise(torch.randn(2, 1, 8, 8), 10, class_labels=[3, 1])


def test_unlabelled_save_load(digits, tmp_path):
    denoiser = da.OptimalDenoiser.from_dataset(digits.images)
    denoiser.save_pretrained(tmp_path)
    loaded = da.OptimalDenoiser.from_pretrained(tmp_path)
    assert loaded.labels is None and "labels" not in dict(loaded.named_buffers())
    assert torch.equal(loaded.images, denoiser.images)


@pytest.mark.parametrize("method", ["optimal", "scfdm", "nearest_dataset"])
def test_cli_fit_keeps_labels(method, tmp_path):
    output = tmp_path / method
    argv = ["fit", "--method", method, "--data", "digits", "--output-dir", str(output), "--config", "chunk_size=300"]
    try:
        assert main(argv) == 0
    finally:
        logging.set_verbosity_warning()
    config = json.loads((output / "unet" / "config.json").read_text())
    assert config["has_labels"] and config["num_images"] == 1797 and config["storage_dtype"] == "uint8"
    assert config["chunk_size"] == 300
    loaded = da.AnalyticDDIMPipeline.from_pretrained(output).unet
    assert torch.equal(loaded.labels, da.load_builtin("digits").labels)
