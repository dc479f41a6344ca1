"""The data module: built-in offline sets, PIL conversion, datasets sources and input validation."""

import numpy as np
import pytest
import torch
from PIL import Image

import diffusers_analytic as da
from diffusers_analytic.data import iter_image_batches, load_patches, pil_to_array


def test_builtin_sets():
    digits = da.load_builtin("digits")
    assert digits.images.shape == (1797, 1, 8, 8) and digits.images.dtype == torch.uint8
    assert digits.images.max() == 255 and sorted(set(digits.labels.tolist())) == list(range(10))
    faces = da.load_builtin("faces")
    assert faces.images.shape == (200, 1, 25, 25) and faces.labels.sum() == 100
    patches = da.load_builtin("patches", size=16, num_images=50, seed=1)
    assert patches.images.shape == (50, 3, 16, 16) and patches.images.dtype == torch.uint8
    assert patches.images.float().std() > 20  # real image content, not a constant
    with pytest.raises(ValueError, match="Unknown built-in"):
        da.load_builtin("cifar")


def test_patches_are_deterministic_per_seed():
    a, b, c = (load_patches(8, 20, seed=s).images for s in (0, 0, 1))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert load_patches(8, 5, channels=1).images.shape == (5, 1, 8, 8)


def test_pil_to_array_resizes_center_crops_and_converts():
    image = Image.fromarray(np.arange(40 * 60 * 3, dtype=np.uint8).reshape(40, 60, 3) % 255)
    assert pil_to_array(image, (20, 20), 3).shape == (3, 20, 20)
    assert pil_to_array(image, (16, 32), 1).shape == (1, 16, 32)
    assert pil_to_array(image, None, 3).shape == (3, 40, 60)


def test_image_folder_through_datasets(tmp_path):
    rng = np.random.default_rng(0)
    for label in ("cats", "dogs"):
        (tmp_path / label).mkdir()
        for i in range(3):
            Image.fromarray(rng.integers(0, 255, (12, 10, 3), dtype=np.uint8)).save(tmp_path / label / f"{i}.png")
    dataset = da.load_image_dataset(str(tmp_path))
    batches = list(iter_image_batches(dataset, batch_size=4, resolution=8, channels=3))
    images = torch.cat([b.images for b in batches])
    labels = torch.cat([b.labels for b in batches])
    assert images.shape == (6, 3, 8, 8) and images.dtype == torch.uint8
    assert sorted(labels.tolist()) == [0, 0, 0, 1, 1, 1]
    with pytest.raises(ValueError, match="no image column 'pixels'"):
        list(iter_image_batches(dataset, image_column="pixels"))


def test_dataset_without_an_image_column_is_a_clear_error():
    import datasets

    dataset = datasets.Dataset.from_dict({"text": ["a", "b"]})
    with pytest.raises(ValueError, match="Could not find an image column"):
        list(iter_image_batches(dataset))


def test_mismatched_labels_and_unsupported_sources():
    with pytest.raises(ValueError, match="3 labels for 4 images"):
        list(iter_image_batches(torch.zeros(4, 1, 2, 2), labels=torch.zeros(3)))
    with pytest.raises(ValueError, match="Cannot read images"):
        list(iter_image_batches("digits"))
    with pytest.raises(ValueError, match="batch_size"):
        list(iter_image_batches(torch.zeros(4, 1, 2, 2), batch_size=0))
