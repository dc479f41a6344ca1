"""Deterministic inputs shared by the torchrun worker and the single-process references of the tests."""

from __future__ import annotations

import torch

import diffusers_analytic as da

from .dp_toys import ToyOptimalDenoiser

NUM_IMAGES = 301  # odd: the two shards differ in size


def digits_images() -> torch.Tensor:
    return da.load_builtin("digits").images[:NUM_IMAGES]  # uint8 [N, 1, 8, 8]


def digits_dataset():
    """The first 500 digits as a `datasets.Dataset` of grey PIL images with labels."""
    import datasets
    from PIL import Image

    digits = da.load_builtin("digits")
    features = datasets.Features({"image": datasets.Image(mode="L"), "label": datasets.Value("int64")})
    data = {
        "image": [Image.fromarray(image[0].numpy()) for image in digits.images[:500]],
        "label": digits.labels[:500].tolist(),
    }
    return datasets.Dataset.from_dict(data, features=features)


def noisy_inputs(denoiser, images: torch.Tensor) -> list:
    """`(x_t, t, kwargs)` triples: noised training images at several t (one shared t, then one t per sample), and
    pure noise."""
    generator = torch.Generator().manual_seed(1234)
    clean = da.data.to_model_space(images[:: len(images) // 5][:5])  # [5, C, H, W]
    inputs = []
    for t in (900, 300, 50):
        a = float(denoiser.alphas_cumprod[t])
        noise = torch.randn(clean.shape, generator=generator)
        inputs.append((a**0.5 * clean + (1 - a) ** 0.5 * noise, t, {}))
    steps = torch.tensor([999, 700, 400, 120, 5])
    a = denoiser.alphas_cumprod[steps].float().reshape(-1, 1, 1, 1)
    inputs.append((a.sqrt() * clean + (1 - a).sqrt() * torch.randn(clean.shape, generator=generator), steps, {}))
    return inputs


def toy_optimal() -> ToyOptimalDenoiser:
    images = digits_images()
    denoiser = ToyOptimalDenoiser(sample_size=8, in_channels=1, num_images=len(images), chunk_size=37)
    denoiser.images.copy_(images)
    return denoiser


def labelled_digits() -> da.ImageSet:
    """Two classes laid out so that class 1 (images 200..300) lives only in the second of two shards."""
    images = digits_images()
    return da.ImageSet(images, (torch.arange(len(images)) >= 200).long(), "digits-2-classes")


def cases() -> list:
    """`(name, fresh denoiser, inputs)` for every data-parallel case; run each input with [`denoise`]."""
    images = digits_images()
    toy = toy_optimal()
    inputs = noisy_inputs(toy, images)
    conditional = [(x_t, t, {"class_labels": [1, 1, 0, 1, 0]}) for x_t, t, _ in inputs[1:3]]
    patches = da.load_builtin("patches", size=4, num_images=201, channels=1)  # every pixel varies: all-ones masks
    all_ones = da.PCALocalityDenoiser.from_dataset(patches, mask_threshold=1e-6, chunk_size=50, show_progress=False)
    seeded = [(x_t, t, {"seed": 7}) for x_t, t, _ in inputs]
    return [
        ("toy_optimal", toy, inputs),
        ("optimal", da.OptimalDenoiser.from_dataset(images, chunk_size=37, show_progress=False), inputs),
        (
            "optimal_class",
            da.OptimalDenoiser.from_dataset(labelled_digits(), chunk_size=64, show_progress=False),
            conditional,
        ),
        (
            "scfdm",
            da.SmoothedCFDMDenoiser.from_dataset(
                images, chunk_size=50, num_noise=3, smoothing_std=0.2, show_progress=False
            ),
            seeded,
        ),
        ("nearest", da.NearestDatasetDenoiser.from_dataset(images, chunk_size=40, show_progress=False), inputs),
        (
            "pca_locality",
            da.PCALocalityDenoiser.from_dataset(images, mask_threshold=0.02, chunk_size=37, show_progress=False),
            inputs,
        ),
        (
            "pca_locality_soft",
            da.PCALocalityDenoiser.from_dataset(images, mask_threshold=0.0, chunk_size=64, show_progress=False),
            inputs[:2],
        ),
        ("pca_locality_all_ones", all_ones, noisy_inputs(all_ones, patches.images)[:2]),
        (
            "pca_locality_class",
            da.PCALocalityDenoiser.from_dataset(
                labelled_digits(), mask_threshold=0.02, chunk_size=64, show_progress=False
            ),
            conditional,
        ),
    ]


def denoise(denoiser, x_t, t, options: dict) -> torch.Tensor:
    """`denoiser.denoise` with `options`: `class_labels`, and `seed` for a fresh generator per sample."""
    generator = None
    if "seed" in options:
        generator = [torch.Generator().manual_seed(options["seed"] + b) for b in range(len(x_t))]
    return denoiser.denoise(x_t, t, generator=generator, class_labels=options.get("class_labels"))


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return float((result.double() - reference.double()).norm() / reference.double().norm())
