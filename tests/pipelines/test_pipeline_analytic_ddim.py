"""AnalyticDDIMPipeline: output types, trajectories, generators, schedule checks, save/load and offline Hub loading."""

import json
import os
import subprocess
import sys

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler

import diffusers_analytic as da


@pytest.fixture(scope="module")
def pipe(digits_small):
    den = da.WienerDenoiser.from_dataset(digits_small, show_progress=False)
    pipeline = da.AnalyticDDIMPipeline(unet=den)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def gen(seed=0):
    return torch.Generator().manual_seed(seed)


def test_default_scheduler_is_ddim_with_the_denoisers_schedule(pipe):
    assert isinstance(pipe.scheduler, DDIMScheduler)
    assert torch.equal(pipe.scheduler.alphas_cumprod.double(), pipe.unet.alphas_cumprod)


def test_output_types(pipe):
    kwargs = dict(batch_size=3, num_inference_steps=10)
    pil = pipe(generator=gen(), **kwargs).images
    assert len(pil) == 3 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8) and pil[0].mode == "L"
    array = pipe(generator=gen(), output_type="np", **kwargs).images
    assert array.shape == (3, 8, 8, 1) and array.min() >= 0 and array.max() <= 1
    tensor = pipe(generator=gen(), output_type="pt", **kwargs).images
    assert tensor.shape == (3, 1, 8, 8) and tensor.min() >= 0 and tensor.max() <= 1
    latent = pipe(generator=gen(), output_type="latent", **kwargs).images
    torch.testing.assert_close(tensor, (latent / 2 + 0.5).clamp(0, 1))
    np.testing.assert_allclose(array, tensor.permute(0, 2, 3, 1).numpy())
    np.testing.assert_array_equal(np.asarray(pil[1])[..., None], (array[1] * 255).round().astype(np.uint8))
    assert pipe(generator=gen(), return_dict=False, **kwargs)[0][0].size == (8, 8)
    with pytest.raises(ValueError, match="output_type"):
        pipe(output_type="jpeg", **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        ({"num_inference_steps": -1}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"num_inference_steps": 2.5}, "num_inference_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": -3}, "batch_size"),
        ({"eta": -0.5}, "eta"),
        ({"eta": float("nan")}, "eta"),
        ({"output_type": "jpeg"}, "output_type"),
    ],
)
def test_meaningless_call_arguments_are_value_errors_naming_them(pipe, kwargs, name):
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        pipe(**{"batch_size": 2, "num_inference_steps": 3, **kwargs})


def test_latent_output_is_not_clamped():
    data = torch.randn(300, 1, 2, 2) * 3 + 4  # far outside [-1, 1]
    den = da.WienerDenoiser.from_dataset(data, show_progress=False, value_range=None)
    pipe = da.AnalyticDDIMPipeline(unet=den, scheduler=DDIMScheduler(clip_sample=False))
    pipe.set_progress_bar_config(disable=True)
    latent = pipe(batch_size=8, num_inference_steps=20, generator=gen(), output_type="latent").images
    assert latent.mean() > 2


def test_intermediates_record_every_step(pipe):
    out = pipe(batch_size=2, num_inference_steps=7, generator=gen(), output_type="latent", return_intermediates=True)
    assert len(out.trajectory_xt) == len(out.trajectory_x0) == len(out.timesteps) == 7
    assert out.timesteps == pipe.scheduler.timesteps.tolist()
    # DDIM's last step goes to a = 1, returning x0_hat clipped to [-1, 1] (clip_sample=True, its default).
    torch.testing.assert_close(out.trajectory_x0[-1].clamp(-1, 1), out.images)
    torch.testing.assert_close(out.trajectory_x0[0], pipe.unet.denoise(out.trajectory_xt[0], out.timesteps[0]))
    plain = pipe(batch_size=2, num_inference_steps=7, generator=gen(), output_type="latent")
    assert plain.trajectory_xt is None
    torch.testing.assert_close(plain.images, out.images)


def test_generator_list_makes_images_independent_of_the_batch(pipe):
    kwargs = dict(num_inference_steps=10, output_type="latent")
    together = pipe(batch_size=4, generator=[gen(i) for i in range(4)], **kwargs).images
    for i in range(4):
        alone = pipe(batch_size=1, generator=[gen(i)], **kwargs).images
        torch.testing.assert_close(alone[0], together[i], rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="generators"):
        pipe(batch_size=3, generator=[gen(0)], **kwargs)


def test_same_generator_same_images_and_stochastic_scheduler_uses_it(pipe):
    ddpm = da.AnalyticDDIMPipeline(unet=pipe.unet, scheduler=DDPMScheduler())
    ddpm.set_progress_bar_config(disable=True)
    a = ddpm(batch_size=2, num_inference_steps=10, generator=gen(1), output_type="latent").images
    b = ddpm(batch_size=2, num_inference_steps=10, generator=gen(1), output_type="latent").images
    c = ddpm(batch_size=2, num_inference_steps=10, generator=gen(2), output_type="latent").images
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert (a - c).abs().max() > 1e-2


def test_swapping_the_scheduler_with_from_config(pipe):
    euler = da.AnalyticDDIMPipeline(unet=pipe.unet, scheduler=pipe.scheduler)
    euler.set_progress_bar_config(disable=True)
    euler.scheduler = EulerDiscreteScheduler.from_config(pipe.scheduler.config)
    images = euler(batch_size=2, num_inference_steps=15, generator=gen(), output_type="np").images
    assert images.shape == (2, 8, 8, 1) and np.isfinite(images).all()


def test_schedule_mismatch_is_a_clear_error(pipe):
    with pytest.raises(ValueError, match=r"scaled_linear.*differs.*linear"):
        da.AnalyticDDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler(beta_schedule="scaled_linear"))
    with pytest.raises(ValueError, match="num_train_timesteps=500"):
        da.AnalyticDDIMPipeline(unet=pipe.unet, scheduler=DDIMScheduler(num_train_timesteps=500))
    swapped = da.AnalyticDDIMPipeline(unet=pipe.unet)
    swapped.scheduler = DDIMScheduler(beta_end=0.012)
    with pytest.raises(ValueError, match="beta_end=0.012"):
        swapped(batch_size=1, num_inference_steps=2)


def test_callback_on_step_end_sees_and_can_replace_latents(pipe):
    seen = []

    def callback(pipeline, i, t, kwargs):
        seen.append((i, int(t), kwargs["latents"].shape))
        return {"latents": kwargs["latents"] * 0} if i == 4 else {}

    out = pipe(
        batch_size=2, num_inference_steps=5, generator=gen(), output_type="latent", callback_on_step_end=callback
    )
    assert [s[0] for s in seen] == list(range(5)) and seen[0][2] == (2, 1, 8, 8)
    assert torch.count_nonzero(out.images) == 0


def test_save_and_load_give_identical_images(pipe, tmp_path):
    pipe.save_pretrained(tmp_path / "pipe")
    index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert index["unet"] == ["diffusers_analytic.models.denoiser_wiener", "WienerDenoiser"]
    assert (tmp_path / "pipe" / "scheduler" / "scheduler_config.json").exists()
    loaded = da.AnalyticDDIMPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    a = pipe(batch_size=3, num_inference_steps=10, generator=gen(3), output_type="np").images
    b = loaded(batch_size=3, num_inference_steps=10, generator=gen(3), output_type="np").images
    np.testing.assert_array_equal(a, b)


def _hf_cache_layout(pipe, hf_home, repo_id: str, commit: str = "a" * 40):
    """Lays out a pipeline in a Hugging Face cache the way `snapshot_download` leaves it."""
    repo_dir = hf_home / "hub" / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    pipe.save_pretrained(snapshot)
    (repo_dir / "refs").mkdir(parents=True)
    (repo_dir / "refs" / "main").write_text(commit)
    return snapshot


def test_loading_a_repo_id_offline_from_the_hf_cache(pipe, tmp_path):
    """`AnalyticDDIMPipeline.from_pretrained("org/name")` with HF_HUB_OFFLINE=1 reads the cache (a fresh process, since
    huggingface_hub reads its environment at import)."""
    _hf_cache_layout(pipe, tmp_path / "hf_home", "analytic-org/wiener-digits")
    expected = pipe(batch_size=2, num_inference_steps=5, generator=gen(9), output_type="np").images
    np.save(tmp_path / "expected.npy", expected)
    script = (
        "import numpy as np, torch, diffusers_analytic as da\n"
        "pipe = da.AnalyticDDIMPipeline.from_pretrained('analytic-org/wiener-digits')\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "out = pipe(batch_size=2, num_inference_steps=5, generator=torch.Generator().manual_seed(9), output_type='np')\n"
        f"np.testing.assert_array_equal(out.images, np.load({str(tmp_path / 'expected.npy')!r}))\n"
        "print('loaded', type(pipe.unet).__name__)\n"
    )
    env = {**os.environ, "HF_HOME": str(tmp_path / "hf_home"), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "loaded WienerDenoiser" in result.stdout
