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


def test_channels_last_batches_are_transposed_with_a_log_line(caplog):
    digits = da.load_builtin("digits").images[:10]  # [10, 1, 8, 8]
    rgb = digits.expand(-1, 3, -1, -1).contiguous()
    for channels_first in (digits, rgb):
        channels_last = channels_first.permute(0, 2, 3, 1).numpy()  # numpy / PIL layout [N, H, W, C]
        with caplog.at_level("INFO", logger="diffusers_analytic"):
            batches = list(iter_image_batches(channels_last, batch_size=4))
        assert torch.equal(torch.cat([b.images for b in batches]), channels_first)
        assert "channels-last" in caplog.text
        caplog.clear()
    denoiser = da.WienerDenoiser.from_dataset(rgb.permute(0, 2, 3, 1).numpy(), show_progress=False)
    assert denoiser.config.in_channels == 3 and denoiser.config.sample_size == 8


def test_float_images_outside_model_space_are_refused_with_the_fix():
    images = da.load_builtin("digits").images[:20]
    with pytest.raises(ValueError, match=r"\[-1, 1\].*divide 8-bit values by 127.5 and subtract 1.*value_range=None"):
        da.WienerDenoiser.from_dataset(images.float(), show_progress=False)
    with pytest.raises(ValueError, match="value_range=None"):
        da.OptimalDenoiser.from_dataset(images.float())
    model_space = images.float() / 127.5 - 1
    assert da.WienerDenoiser.from_dataset(model_space, show_progress=False).mean.abs().max() <= 1
    rounded = (model_space * 1.0001).half()  # rounding past +-1 is accepted
    list(iter_image_batches(rounded))
    gaussian = torch.randn(50, 1, 2, 2) * 3  # data that really lives elsewhere: the documented opt-out
    denoiser = da.WienerDenoiser.from_dataset(gaussian, show_progress=False, value_range=None)
    torch.testing.assert_close(denoiser.mean, gaussian.reshape(50, -1).mean(0), rtol=0, atol=1e-5)
    assert len(list(iter_image_batches(gaussian * 10, value_range=(-100, 100)))) == 1


def test_a_typo_of_a_builtin_or_a_missing_local_path_fails_at_once(tmp_path, monkeypatch):
    import time

    start = time.perf_counter()
    with pytest.raises(ValueError, match="did you mean the built-in 'digits'.*digits, faces, patches"):
        da.load_image_dataset("digitz")
    with pytest.raises(ValueError, match="'faces'"):
        da.load_image_dataset("Face")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    for missing in ("data/mnist", "./mnist", str(tmp_path / "nowhere"), "a/b/c"):
        with pytest.raises(FileNotFoundError, match="No such local folder"):
            da.load_image_dataset(missing)
    assert time.perf_counter() - start < 5  # no Hub round trips
