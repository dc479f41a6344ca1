"""Checks every registered denoiser must pass: the shared base's schedule, timestep handling, prediction types, dtypes,
input validation and save/load. Parametrised over `registry.DENOISERS`, so a new method is covered when registered."""

import math
import threading

import numpy as np
import pytest
import torch

import diffusers_analytic as da
from diffusers_analytic.registry import DENOISERS

METHODS = sorted(DENOISERS)


@pytest.fixture(scope="module")
def fitted(digits_small):
    """Each registered method fitted on 300 digits (default config)."""
    return {name: cls.from_dataset(digits_small, show_progress=False) for name, cls in DENOISERS.items()}


def noisy(images: torch.Tensor, a: float, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x0 = images.float() / 127.5 - 1
    return math.sqrt(a) * x0 + math.sqrt(1 - a) * torch.randn(x0.shape, generator=g)


def test_registry_holds_wiener():
    assert DENOISERS["wiener"] is da.WienerDenoiser
    with pytest.raises(ValueError, match="Unknown method"):
        da.get_denoiser_class("wienr")


@pytest.mark.parametrize("method", METHODS)
def test_denoise_shape_dtype_and_finiteness_across_the_schedule(fitted, digits_small, method):
    den = fitted[method]
    for t in (0, 0.5, 10, 500, 998.25, 999):
        x = noisy(digits_small.images[:3], den.alphas_cumprod[int(t)].item())
        out = den.denoise(x, t, generator=torch.Generator().manual_seed(0))
        assert out.shape == x.shape and out.dtype == x.dtype
        assert torch.isfinite(out).all(), (method, t)


@pytest.mark.parametrize("method", METHODS)
def test_timestep_forms_agree(fitted, digits_small, method):
    den = fitted[method]
    x = noisy(digits_small.images[:3], 0.5)
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    expected = den.denoise(x, 250, generator=g())
    forms = [
        250.0,
        torch.tensor(250),
        torch.tensor(250, dtype=torch.float32),
        torch.tensor(250.0, dtype=torch.float64),
        torch.tensor([250]),
        torch.full((3,), 250, dtype=torch.int64),
        torch.full((3,), 250.0, dtype=torch.float64),
    ]
    for form in forms:
        torch.testing.assert_close(den.denoise(x, form, generator=g()), expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_per_sample_timesteps_equal_separate_calls(fitted, digits_small, method):
    den = fitted[method]
    x = noisy(digits_small.images[:3], 0.3)
    timesteps = torch.tensor([20.0, 400.5, 900.0])
    generators = lambda: [torch.Generator().manual_seed(b) for b in range(3)]  # noqa: E731  one per sample
    together = den.denoise(x, timesteps, generator=generators())
    for b in range(3):
        alone = den.denoise(x[b : b + 1], timesteps[b], generator=generators()[b : b + 1])
        torch.testing.assert_close(together[b : b + 1], alone, rtol=1e-5, atol=1e-5)


def test_fractional_timesteps_interpolate_log_sigma(fitted):
    den = fitted["wiener"]
    alphas = den.alphas_cumprod
    integer_t = torch.arange(0, 1000, dtype=torch.float64)
    a, b = den.alpha_prod_at(integer_t)
    assert torch.equal(a, alphas) and torch.allclose(a + b, torch.ones_like(a), atol=0, rtol=1e-15)
    fine = torch.linspace(0, 999, 9991, dtype=torch.float64)
    a_fine, b_fine = den.alpha_prod_at(fine)
    assert (a_fine[1:] <= a_fine[:-1]).all()  # monotone: more noise as t grows
    log_sigma = 0.5 * (torch.log(b_fine) - torch.log(a_fine))
    # Linear in t between integer points.
    t = torch.tensor([10.0, 10.25, 10.5, 11.0], dtype=torch.float64)
    ls = 0.5 * (torch.log(den.alpha_prod_at(t)[1]) - torch.log(den.alpha_prod_at(t)[0]))
    assert ls[1].item() == pytest.approx((0.75 * ls[0] + 0.25 * ls[3]).item(), rel=1e-12)
    assert ls[2].item() == pytest.approx((0.5 * ls[0] + 0.5 * ls[3]).item(), rel=1e-12)
    assert torch.isfinite(log_sigma).all()


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("method", METHODS)
def test_prediction_types_convert_exactly(digits_small, method, prediction_type):
    den = DENOISERS[method].from_dataset(digits_small, prediction_type=prediction_type, show_progress=False)
    t = 321.5
    a = den.alpha_prod_at(t)[0].item()
    x = noisy(digits_small.images[:4], a, seed=3)
    out = den(x, t, generator=torch.Generator().manual_seed(0))
    x0 = out.pred_original_sample.double()
    torch.testing.assert_close(x0.float(), den.denoise(x, t, generator=torch.Generator().manual_seed(0)))
    xd = x.double()
    expected = {
        "epsilon": (xd - math.sqrt(a) * x0) / math.sqrt(1 - a),
        "v_prediction": math.sqrt(a) * (xd - math.sqrt(a) * x0) / math.sqrt(1 - a) - math.sqrt(1 - a) * x0,
        "sample": x0,
    }[prediction_type]
    torch.testing.assert_close(out.sample.double(), expected, rtol=1e-5, atol=1e-5)
    assert den(x, t, return_dict=False, generator=torch.Generator().manual_seed(0))[0].shape == x.shape


@pytest.mark.parametrize("method", METHODS)
def test_zero_terminal_snr_and_last_steps_are_finite(digits_small, method):
    den = DENOISERS[method].from_dataset(
        digits_small, rescale_betas_zero_snr=True, prediction_type="v_prediction", show_progress=False
    )
    assert den.alphas_cumprod[-1].item() == 0.0  # a -> 0 exactly
    x = torch.randn(2, *den.sample_shape)
    for t in (999, 998.5, 0, 0.25):
        out = den(x, t, generator=torch.Generator().manual_seed(0))
        assert torch.isfinite(out.sample).all() and torch.isfinite(out.pred_original_sample).all(), t
    eps_den = DENOISERS[method].from_dataset(digits_small, rescale_betas_zero_snr=True, show_progress=False)
    out = eps_den(x, 999, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(out.sample, x)  # at a = 0 the noise is the sample itself


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("method", METHODS)
def test_low_and_high_precision_inputs(fitted, digits_small, method, dtype):
    den = fitted[method]
    x = noisy(digits_small.images[:2], 0.6)
    reference = den.denoise(x.to(dtype).float(), 200, generator=torch.Generator().manual_seed(0))
    out = den.denoise(x.to(dtype), 200, generator=torch.Generator().manual_seed(0))
    assert out.dtype == dtype
    tolerance = {torch.float16: 2e-3, torch.bfloat16: 1e-2, torch.float64: 1e-6}[dtype]
    torch.testing.assert_close(out.float(), reference, rtol=0, atol=tolerance)


@pytest.mark.parametrize("method", METHODS)
def test_bad_inputs_are_clear_errors(fitted, method):
    den = fitted[method]
    x = torch.zeros(2, 1, 8, 8)
    cases = [
        (lambda: den.denoise(torch.full_like(x, float("nan")), 10), "NaN"),
        (lambda: den.denoise(torch.zeros(2, 3, 8, 8), 10), r"\[batch, 1, 8, 8\]"),
        (lambda: den.denoise(torch.zeros(2, 1, 9, 8), 10), "sample_size"),
        (lambda: den.denoise(torch.zeros(1, 8, 8), 10), "shape"),
        (lambda: den.denoise(x, 1000), r"\[0, 999\]"),
        (lambda: den.denoise(x, -1), r"\[0, 999\]"),
        (lambda: den.denoise(x, 999.5), r"\[0, 999\]"),
        (lambda: den.denoise(x, float("nan")), "finite"),
        (lambda: den.denoise(x, torch.tensor([1, 2, 3])), "3 entries for a batch of 2"),
        (lambda: den.denoise(x, torch.zeros(2, 2)), "1-d"),
        (lambda: den.denoise(x, "10"), "int, a float or a tensor"),
        (lambda: den.denoise(x.long(), 10), "floating"),
        (lambda: den.denoise(torch.zeros(0, 1, 8, 8), 10), "no image"),
    ]
    for call, message in cases:
        with pytest.raises(ValueError, match=message):
            call()


def test_class_labels_without_stored_labels_are_an_error(fitted):
    with pytest.raises(ValueError, match="fitted without labels"):
        fitted["wiener"].denoise(torch.zeros(2, 1, 8, 8), 10, class_labels=[1, 2])


@pytest.mark.parametrize("method", METHODS)
def test_save_and_load_round_trip(fitted, digits_small, method, tmp_path):
    den = fitted[method]
    den.save_pretrained(tmp_path / method)
    loaded = DENOISERS[method].from_pretrained(tmp_path / method)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(den.config)
    for name, buffer in den.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], buffer), name
        assert loaded.state_dict()[name].dtype == buffer.dtype, name
    x = noisy(digits_small.images[:3], 0.4)
    g = lambda: torch.Generator().manual_seed(5)  # noqa: E731
    torch.testing.assert_close(
        loaded.denoise(x, 450.5, generator=g()), den.denoise(x, 450.5, generator=g()), rtol=0, atol=0
    )


def test_truncated_weights_file_is_a_clear_error(fitted, tmp_path):
    fitted["wiener"].save_pretrained(tmp_path / "w")
    weights = next((tmp_path / "w").glob("*.safetensors"))
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])
    with pytest.raises((OSError, ValueError), match="(?i)safetensors|load|deserializ|truncat"):
        da.WienerDenoiser.from_pretrained(tmp_path / "w")


def test_schedule_of_default_denoiser_equals_ddim_default(fitted):
    from diffusers import DDIMScheduler

    np.testing.assert_array_equal(
        fitted["wiener"].alphas_cumprod.numpy(), DDIMScheduler().alphas_cumprod.double().numpy()
    )


# ---------------------------------------------------------------------------------------------- the ways users run one
def _fresh(method, source):
    return DENOISERS[method].from_dataset(source, show_progress=False)


@pytest.mark.parametrize("method", METHODS)
def test_every_way_a_diffusers_user_runs_a_model_gives_the_plain_result(digits_small, method, tmp_path):
    """inference_mode (fit, load, call), no_grad, non-contiguous and channels_last input, batch 1, float16, a `[B]`
    timestep, save / load and two threads making the first call at once: all give the plain single-thread result."""
    data = da.ImageSet(digits_small.images[:120], digits_small.labels[:120])
    den = _fresh(method, data)
    x = noisy(digits_small.images[120:124], 0.4, seed=7)
    t = 451.5
    g = lambda: torch.Generator().manual_seed(11)  # noqa: E731
    expected = den.denoise(x, t, generator=g())
    den.save_pretrained(tmp_path / "plain")

    def check(model, sample=x, timestep=t, atol=0.0):
        out = model.denoise(sample, timestep, generator=g())
        torch.testing.assert_close(out.float(), expected, rtol=0, atol=atol)

    # inference_mode: fit, load, call and save there; then use those models in every mode, in any order.
    with torch.inference_mode():
        fitted_in = _fresh(method, data)
        loaded_in = DENOISERS[method].from_pretrained(tmp_path / "plain")
        check(fitted_in)
        check(loaded_in)
        fitted_in.save_pretrained(tmp_path / "inference")
        check(den)  # a model fitted outside, called inside
    for model in (fitted_in, loaded_in, DENOISERS[method].from_pretrained(tmp_path / "inference")):
        check(model)
        with torch.no_grad():
            check(model)
        with torch.inference_mode():
            check(model)
    with torch.no_grad():
        check(DENOISERS[method].from_pretrained(tmp_path / "plain"))

    # Memory layouts, batch 1, float16, per-sample timesteps.
    check(den, x.transpose(2, 3).contiguous().transpose(2, 3))  # non-contiguous, same values
    check(den, x.to(memory_format=torch.channels_last))
    check(den, x, torch.full((len(x),), t, dtype=torch.float64))
    single = den.denoise(x[1:2], t, generator=[g()])
    assert single.shape == (1, *den.sample_shape) and torch.isfinite(single).all()
    if method != "scfdm":  # (its noise per sample depends on the batch's generator draws)
        torch.testing.assert_close(single, expected[1:2], rtol=0, atol=1e-5)
    half = den.denoise(x.half(), t, generator=g())
    assert half.dtype == torch.float16
    torch.testing.assert_close(half.float(), den.denoise(x.half().float(), t, generator=g()), rtol=0, atol=2e-3)

    # Two threads make the first call of a freshly loaded model at once (lazily built caches).
    for _ in range(3):
        model = DENOISERS[method].from_pretrained(tmp_path / "plain")
        for result in _race(lambda model=model: model.denoise(x, t, generator=g())):
            torch.testing.assert_close(result, expected, rtol=0, atol=0)


def _race(call, threads: int = 2) -> list:
    """Runs `call()` in `threads` threads released at once; returns their results (re-raises the first error)."""
    barrier, results, errors = threading.Barrier(threads), [None] * threads, []

    def run(slot):
        try:
            barrier.wait()
            results[slot] = call()
        except BaseException as error:  # noqa: BLE001 - re-raised below
            errors.append(error)

    workers = [threading.Thread(target=run, args=(slot,)) for slot in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    if errors:
        raise errors[0]
    return results


def test_lazily_built_caches_are_built_once_when_threads_race(digits_small, monkeypatch):
    import copy
    import time

    from diffusers_analytic.kernels import stored_images
    from diffusers_analytic.models import denoiser_pca_locality

    built = []

    def slowly(function):
        def wrapper(*args, **kwargs):
            built.append(function.__name__)
            time.sleep(0.05)
            return function(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(stored_images, "image_chunks", slowly(stored_images.image_chunks))
    stats = stored_images.StoredImageStats()
    means = _race(lambda: stats.get(digits_small.images, 64)[0])
    assert built == ["image_chunks", "image_chunks"]  # one pass for the mean, one for the norms: once in all
    torch.testing.assert_close(means[0], means[1], rtol=0, atol=0)

    den = da.PCALocalityDenoiser.from_dataset(digits_small, show_progress=False)
    monkeypatch.setattr(denoiser_pca_locality, "pca_locality_mask", slowly(denoiser_pca_locality.pca_locality_mask))
    built.clear()
    masks = _race(lambda: den.locality_mask(0.5))
    assert built == ["pca_locality_mask"] and masks[0] is masks[1]
    copy.deepcopy(den).denoise(torch.zeros(1, 1, 8, 8), 10)  # the caches' locks do not prevent copies


def test_loading_another_class_or_incomplete_weights_is_an_error(fitted, tmp_path):
    from safetensors.torch import load_file, save_file

    fitted["optimal"].save_pretrained(tmp_path / "optimal")
    with pytest.raises(
        ValueError, match="saved by OptimalDenoiser.*not WienerDenoiser.*OptimalDenoiser.from_pretrained"
    ):
        da.WienerDenoiser.from_pretrained(tmp_path / "optimal")
    fitted["wiener"].save_pretrained(tmp_path / "wiener")
    with pytest.raises(ValueError, match="saved by WienerDenoiser"):
        da.PCALocalityDenoiser.from_pretrained(tmp_path / "wiener")
    weights = next((tmp_path / "wiener").glob("*.safetensors"))
    state = load_file(weights)
    del state["eigvals"]
    save_file(state, weights)
    with pytest.raises(ValueError, match=r"lack \['eigvals'\], which WienerDenoiser needs"):
        da.WienerDenoiser.from_pretrained(tmp_path / "wiener")
    model, info = da.OptimalDenoiser.from_pretrained(tmp_path / "optimal", output_loading_info=True)
    assert info["missing_keys"] == [] and torch.equal(model.images, fitted["optimal"].images)


def test_every_method_estimates_its_work_linearly_in_the_batch(fitted):
    for method, denoiser in fitted.items():
        # affine in the batch: a per-sample part (> 0) and a fixed part (the PCA mask of a noise level)
        one, eight, fifteen = (denoiser.estimated_flops(b) for b in (1, 8, 15))
        assert one > 0 and eight - one > 0, (method, one, eight)
        assert fifteen - eight == pytest.approx(eight - one, rel=1e-9), method
