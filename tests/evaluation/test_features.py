"""The feature path offline: a tiny randomly initialised DINOv2 built from a `transformers` config, saved with its
image processor to a temporary folder (no download), then loaded through `AutoModel` / `AutoImageProcessor`."""

import pytest
import torch

from diffusers_analytic.data import to_model_space
from diffusers_analytic.evaluation import FeatureEncoder, evaluate_samples, frechet_distance

transformers = pytest.importorskip("transformers")


def save_tiny_encoder(folder) -> str:
    """A 2-layer DINOv2 (hidden size 32, 32x32 inputs, 8x8 patches) and its processor, in `folder`."""
    config = transformers.Dinov2Config(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
    )
    torch_state = torch.random.get_rng_state()
    try:
        torch.random.manual_seed(0)  # restored below: the tests' global generator is left as it was
        model = transformers.Dinov2Model(config)
    finally:
        torch.random.set_rng_state(torch_state)
    processor = transformers.BitImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}, do_convert_rgb=True
    )
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_encoder_folder(tmp_path_factory):
    return save_tiny_encoder(tmp_path_factory.mktemp("tiny-dinov2"))


@pytest.fixture(scope="session")
def encoder(tiny_encoder_folder):
    return FeatureEncoder.from_pretrained(tiny_encoder_folder, device="cpu", batch_size=7, show_progress=False)


def test_encoder_embeds_images_offline(encoder, digits):
    images = digits.images[:20]  # uint8 [20, 1, 8, 8]: grey, repeated to RGB for the encoder
    features = encoder(images)
    assert features.shape == (20, 32) and features.dtype == torch.float32 and torch.isfinite(features).all()
    # Batches do not change the result, and model-space floats are read as the same pixels.
    torch.testing.assert_close(features[7:9], encoder(images[7:9]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(features, encoder(to_model_space(images)), rtol=1e-4, atol=1e-5)
    assert not torch.allclose(features[0], features[1])
    rgb = encoder(torch.randint(0, 256, (3, 3, 12, 12), dtype=torch.uint8))
    assert rgb.shape == (3, 32)


def test_feature_metrics(encoder, digits):
    reference = digits.images[:60]
    itself = evaluate_samples(reference, reference, encoder=encoder, max_reference_queries=20)
    metrics = itself.to_dict()
    assert metrics["feature_model"] == encoder.name
    assert metrics["memorized_fraction_features"] == 1.0 and metrics["fd_features"] == pytest.approx(0.0, abs=1e-6)
    noise = torch.randint(0, 256, (20, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    other = evaluate_samples(noise, reference, encoder=encoder, max_reference_queries=20).to_dict()
    assert other["fd_features"] > 0 and other["memorized_fraction_features"] <= 0.2
    assert other["fd_features"] == pytest.approx(frechet_distance(encoder(noise), encoder(reference)), rel=1e-9)


def test_a_model_that_cannot_be_loaded_is_a_one_line_value_error(tmp_path):
    for name in (str(tmp_path), "no-such-org/no-such-model-xyz"):
        with pytest.raises(ValueError, match="Could not load the feature model") as info:
            FeatureEncoder.from_pretrained(name, device="cpu")
        assert "\n" not in str(info.value) and "facebook/dinov2-base" in str(info.value)
    with pytest.raises(ValueError, match=r"\[N, C, H, W\]"):
        FeatureEncoder.from_pretrained(save_tiny_encoder(tmp_path / "m"), device="cpu")(torch.zeros(3, 8, 8))
