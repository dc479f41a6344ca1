"""OptimalDenoiser: the streamed exact posterior mean against a float64 brute force of its formula (docs/math.md)."""

import pytest
import torch
from diffusers import DDIMScheduler

import diffusers_analytic as da
from diffusers_analytic.data import to_model_space
from diffusers_analytic.kernels import empirical, empirical_cpu, stored_images
from diffusers_analytic.kernels.online_softmax import OnlineSoftmax

TIMESTEPS = (999, 900, 500, 100, 30)


@pytest.fixture(scope="module")
def digits():
    return da.load_builtin("digits")


@pytest.fixture(scope="module")
def digits_model_space(digits):
    return digits.images.double().reshape(len(digits.images), -1) / 127.5 - 1.0  # y  [N, 64] float64


def brute_force_optimal(x, alpha_prod, y, temperature=1.0):
    """Float64 one-shot softmax: w_i = softmax(-||x - sqrt(a) y_i||^2 / (2 (1 - a) tau)), x0_hat = sum_i w_i y_i."""
    x = x.double().reshape(len(x), -1)
    a = torch.as_tensor(alpha_prod, dtype=torch.float64)
    distances = ((x[:, None, :] - a.sqrt() * y[None]) ** 2).sum(-1)  # [B, N]
    weights = torch.softmax(-distances / (2 * (1 - a) * temperature), dim=1)
    return weights @ y


def noisy_inputs(y, alpha_prod, batch_size, seed, from_data):
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(batch_size, y.shape[1], generator=generator, dtype=torch.float64)
    if not from_data:
        return noise.float()
    index = torch.randint(0, len(y), (batch_size,), generator=generator)
    return (alpha_prod.sqrt() * y[index] + (1 - alpha_prod).sqrt() * noise).float()


def relative_error(out, ref):
    return ((out.double().reshape(len(ref), -1) - ref).norm() / ref.norm()).item()


@pytest.mark.parametrize("from_data", [True, False], ids=["data+noise", "pure-noise"])
@pytest.mark.parametrize("timestep", TIMESTEPS)
def test_matches_float64_brute_force(digits, digits_model_space, timestep, from_data):
    denoiser = da.OptimalDenoiser.from_dataset(digits, chunk_size=256)
    a = denoiser.alphas_cumprod[timestep]
    x = noisy_inputs(digits_model_space, a, 16, seed=timestep, from_data=from_data)
    out = denoiser.denoise(x.reshape(16, 1, 8, 8), timestep)
    assert out.dtype == torch.float32 and out.shape == (16, 1, 8, 8)
    assert relative_error(out, brute_force_optimal(x, a, digits_model_space)) <= 1e-4


@pytest.mark.parametrize("chunk_size", [1, 7, 1797])
@pytest.mark.parametrize("timestep", [900, 100])
def test_any_chunk_size_equals_full_softmax(digits, digits_model_space, chunk_size, timestep):
    denoiser = da.OptimalDenoiser.from_dataset(digits, chunk_size=chunk_size)
    a = denoiser.alphas_cumprod[timestep]
    x = noisy_inputs(digits_model_space, a, 4, seed=1, from_data=True)
    out = denoiser.denoise(x.reshape(4, 1, 8, 8), timestep)
    assert relative_error(out, brute_force_optimal(x, a, digits_model_space)) <= 1e-4


@pytest.fixture
def path_spy(monkeypatch):
    """Forces the fused or the general path of `posterior_mean`, small pieces, and counts what ran."""
    counts = {"fused": 0, "general": 0}
    fused, general = empirical_cpu._fused_state, empirical_cpu._general_update

    def count_fused(*args, **kwargs):
        counts["fused"] += 1
        return fused(*args, **kwargs)

    def count_general(*args, **kwargs):
        counts["general"] += 1
        return general(*args, **kwargs)

    monkeypatch.setattr(empirical_cpu, "_fused_state", count_fused)
    monkeypatch.setattr(empirical_cpu, "_general_update", count_general)
    monkeypatch.setattr(stored_images, "PIECE_BYTES", {"cpu": 4 * 64 * 5, "other": 4 * 64 * 5})  # 5 digits per piece
    monkeypatch.setattr(stored_images, "MIN_PIECE_IMAGES", 1)

    def force(path):
        monkeypatch.setattr(empirical_cpu, "BROAD_ACTIVE_FRACTION", 0.0 if path == "fused" else 2.0)
        counts.update(fused=0, general=0)
        return counts

    return force


@pytest.mark.parametrize("path", ["fused", "general"])
@pytest.mark.parametrize("storage_dtype", ["uint8", "float32"])
@pytest.mark.parametrize("timestep", [999, 500, 100, 10])
def test_both_paths_match_float64_brute_force(digits, digits_model_space, path_spy, path, storage_dtype, timestep):
    # Forced onto either path at every noise level (the fused one at low noise only by redoing the chunks whose
    # logits exceed its reference), in chunks of 64 read 5 images per piece: the result is the one-shot softmax.
    denoiser = da.OptimalDenoiser.from_dataset(digits, chunk_size=64, storage_dtype=storage_dtype)
    a = denoiser.alphas_cumprod[timestep]
    x = noisy_inputs(digits_model_space, a, 6, seed=timestep + 1, from_data=True)
    counts = path_spy(path)
    out = denoiser.denoise(x.reshape(6, 1, 8, 8), timestep)
    assert relative_error(out, brute_force_optimal(x, a, digits_model_space)) <= 1e-4
    num_chunks = -(-len(digits_model_space) // 64)
    if path == "general":
        assert counts == {"fused": 0, "general": num_chunks}
    else:
        assert counts["fused"] == 1 and counts["general"] <= num_chunks
        if timestep == 999:  # broad: no chunk exceeds the reference
            assert counts["general"] == 0
        if timestep == 10:  # peaked: chunks whose logits exceed the first piece's reference by > 50 were redone
            assert counts["general"] > 0


@pytest.mark.parametrize("path", ["fused", "general"])
def test_both_paths_restrict_to_the_class(digits, digits_model_space, path_spy, path, monkeypatch):
    # (the fused path needs every requested class in its first piece: 50 digits per piece here)
    monkeypatch.setattr(stored_images, "PIECE_BYTES", {"cpu": 4 * 64 * 50, "other": 4 * 64 * 50})
    monkeypatch.setattr(stored_images, "MIN_PIECE_IMAGES", 1)
    denoiser = da.OptimalDenoiser.from_dataset(digits, chunk_size=100)
    labels = torch.tensor([2, 2, 9])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(7))
    for timestep in (950, 200):
        counts = path_spy(path)
        out = denoiser.denoise(x.reshape(3, 1, 8, 8), timestep, class_labels=labels)
        assert counts[path] > 0
        a = denoiser.alphas_cumprod[timestep]
        for b in range(3):
            members = digits_model_space[digits.labels == labels[b]]
            assert relative_error(out[b : b + 1], brute_force_optimal(x[b : b + 1], a, members)) <= 1e-4


def test_the_path_follows_the_posterior_width(digits, digits_model_space, monkeypatch):
    # Unforced: a broad posterior (pure noise at t = 999) takes the fused path, a peaked one (t = 30) the general.
    # (Pieces of 500 digits: all 1797 in one piece would take the one-GEMM path.)
    monkeypatch.setattr(stored_images, "PIECE_BYTES", {"cpu": 4 * 64 * 500, "other": 4 * 64 * 500})
    monkeypatch.setattr(stored_images, "MIN_PIECE_IMAGES", 1)
    counts = {"fused": 0}
    fused = empirical_cpu._fused_state
    monkeypatch.setattr(
        empirical_cpu, "_fused_state", lambda *a, **k: counts.update(fused=counts["fused"] + 1) or fused(*a, **k)
    )
    denoiser = da.OptimalDenoiser.from_dataset(digits)
    denoiser.denoise(torch.randn(4, 1, 8, 8), 999)
    assert counts["fused"] == 1
    x = noisy_inputs(digits_model_space, denoiser.alphas_cumprod[30], 4, seed=0, from_data=True)
    denoiser.denoise(x.reshape(4, 1, 8, 8), 30)
    assert counts["fused"] == 1


def test_pieces_hold_at_least_min_piece_images():
    large = torch.zeros(1000, 3, 64, 64, dtype=torch.uint8)  # 2 MiB of float32 is 42 of these
    assert stored_images.piece_size(torch.device("cpu"), 4096, large) == stored_images.MIN_PIECE_IMAGES
    assert stored_images.piece_size(torch.device("cpu"), 100, large) == 100  # chunk_size still caps it
    small = torch.zeros(5000, 3, 8, 8, dtype=torch.uint8)
    assert stored_images.piece_size(torch.device("cpu"), 4096, small) == stored_images.PIECE_BYTES["cpu"] // (4 * 192)


@pytest.mark.parametrize("storage_dtype", ["uint8", "float16", "float32"])
@pytest.mark.parametrize("timestep", [999, 500, 30, 0])
def test_a_small_set_is_one_gemm_over_a_decoded_copy(digits, digits_model_space, monkeypatch, storage_dtype, timestep):
    # All 1797 digits fit in one piece: one GEMM and one softmax over a float32 copy made once, exact.
    paths = {"one piece": 0, "blocks": 0}
    one_piece, layouts = empirical_cpu._one_piece_logits, empirical_cpu._block_layouts
    monkeypatch.setattr(
        empirical_cpu,
        "_one_piece_logits",
        lambda *a: paths.update({"one piece": paths["one piece"] + 1}) or one_piece(*a),
    )
    monkeypatch.setattr(
        empirical_cpu, "_block_layouts", lambda *a: paths.update(blocks=paths["blocks"] + 1) or layouts(*a)
    )
    denoiser = da.OptimalDenoiser.from_dataset(digits, storage_dtype=storage_dtype)
    a = denoiser.alphas_cumprod[timestep]
    x = noisy_inputs(digits_model_space, a, 5, seed=timestep, from_data=True)
    out = denoiser.denoise(x.reshape(5, 1, 8, 8), timestep)
    stored = to_model_space(denoiser.images, torch.float64).reshape(len(digits_model_space), -1)
    assert relative_error(out, brute_force_optimal(x, a, stored)) <= 1e-4
    assert paths == {"one piece": 1, "blocks": 0}
    copy = denoiser.images_for_call()
    assert copy.dtype == torch.float32 and (copy is denoiser.images) == (storage_dtype == "float32")
    assert denoiser.images_for_call() is copy  # made once
    denoiser.images[0] = denoiser.images[1]  # an in-place write refreshes it
    assert denoiser.images_for_call() is not copy or storage_dtype == "float32"
    torch.testing.assert_close(denoiser.images_for_call()[0], denoiser.images_for_call()[1])


@pytest.mark.parametrize("temperature", [0.3, 2.5])
def test_temperature_scales_logits(digits, digits_model_space, temperature):
    denoiser = da.OptimalDenoiser.from_dataset(digits, temperature=temperature, chunk_size=100)
    a = denoiser.alphas_cumprod[700]
    x = noisy_inputs(digits_model_space, a, 8, seed=2, from_data=False)
    out = denoiser.denoise(x.reshape(8, 1, 8, 8), 700)
    ref = brute_force_optimal(x, a, digits_model_space, temperature)
    assert relative_error(out, ref) <= 1e-4
    # and the temperature matters: tau = 1 gives a different answer
    assert relative_error(out, brute_force_optimal(x, a, digits_model_space)) > 1e-3


def test_per_sample_timesteps_and_fractional(digits, digits_model_space):
    denoiser = da.OptimalDenoiser.from_dataset(digits)
    x = torch.randn(3, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    timesteps = torch.tensor([10.0, 400.5, 990.0])
    out = denoiser.denoise(x, timesteps)
    alpha_prod, _ = denoiser.alpha_prod_at(timesteps)
    for b in range(3):
        ref = brute_force_optimal(x[b : b + 1], alpha_prod[b], digits_model_space)
        assert relative_error(out[b : b + 1], ref) <= 1e-4


def test_edge_noise_levels_are_finite_and_correct(digits, digits_model_space):
    # 1 - a = 0 exactly (a schedule with a zero first beta): the posterior is the nearest image, not NaN.
    betas = [0.0] + [0.02] * 9
    denoiser = da.OptimalDenoiser.from_dataset(digits, num_train_timesteps=10, trained_betas=betas)
    x = digits_model_space[:4].float().reshape(4, 1, 8, 8) + 0.01
    out = denoiser.denoise(x, 0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double().reshape(4, -1), digits_model_space[:4], atol=1e-6, rtol=0)
    # a = 0 (zero terminal SNR): every image weighs the same, the output is the data mean.
    zero_snr = da.OptimalDenoiser.from_dataset(digits, rescale_betas_zero_snr=True)
    assert zero_snr.alphas_cumprod[-1] == 0
    out = zero_snr.denoise(torch.randn(2, 1, 8, 8), 999)
    mean = digits_model_space.mean(0)
    torch.testing.assert_close(out.double().reshape(2, -1), mean.expand(2, -1), atol=1e-5, rtol=0)


def test_top_k_with_all_images_equals_exact(digits):
    subset = da.ImageSet(digits.images[:300], digits.labels[:300])
    exact = da.OptimalDenoiser.from_dataset(subset)
    top_k = da.OptimalDenoiser.from_dataset(subset, num_neighbors=300)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(4))
    for timestep in (900, 300, 20):
        torch.testing.assert_close(top_k.denoise(x, timestep), exact.denoise(x, timestep), atol=1e-5, rtol=1e-5)


def test_top_k_small_k_is_the_softmax_over_the_k_nearest(digits, digits_model_space):
    denoiser = da.OptimalDenoiser.from_dataset(digits, num_neighbors=5)
    a = denoiser.alphas_cumprod[300]
    x = noisy_inputs(digits_model_space, a, 4, seed=5, from_data=True)
    out = denoiser.denoise(x.reshape(4, 1, 8, 8), 300)
    distances = ((x.double()[:, None] - a.sqrt() * digits_model_space[None]) ** 2).sum(-1)
    for b in range(4):
        nearest = distances[b].argsort()[:5]
        ref = brute_force_optimal(x[b : b + 1], a, digits_model_space[nearest])
        assert relative_error(out[b : b + 1], ref) <= 1e-4


def test_top_k_ivf_probing_every_list_equals_flat(digits):
    flat = da.OptimalDenoiser.from_dataset(digits, num_neighbors=20, faiss_index="flat")
    ivf = da.OptimalDenoiser.from_dataset(digits, num_neighbors=20, faiss_index="ivf", ivf_nprobe=10_000)
    approximate = da.OptimalDenoiser.from_dataset(digits, num_neighbors=20, faiss_index="ivf", ivf_nprobe=1)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(8))
    torch.testing.assert_close(ivf.denoise(x, 200), flat.denoise(x, 200), atol=1e-5, rtol=1e-5)
    assert torch.isfinite(approximate.denoise(x, 200)).all()


def test_inference_mode(digits):
    with torch.inference_mode():
        denoiser = da.OptimalDenoiser.from_dataset(da.ImageSet(digits.images[:30]))
        out = denoiser.denoise(torch.randn(2, 1, 8, 8), 100)
    assert torch.isfinite(out).all()


def test_uint8_storage_equals_float_storage(digits):
    as_uint8 = da.OptimalDenoiser.from_dataset(digits)
    as_float = da.OptimalDenoiser.from_dataset(digits.images.float() / 127.5 - 1.0)
    as_half = da.OptimalDenoiser.from_dataset(digits, storage_dtype="float16")
    assert as_uint8.images.dtype == torch.uint8 and as_uint8.config.storage_dtype == "uint8"
    assert as_float.images.dtype == torch.float32 and as_half.images.dtype == torch.float16
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(6))
    for timestep in (900, 500, 50):
        torch.testing.assert_close(as_uint8.denoise(x, timestep), as_float.denoise(x, timestep), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(as_half.denoise(x, timestep), as_float.denoise(x, timestep), atol=2e-3, rtol=0)


def test_save_load_round_trips_uint8_images_and_labels(digits, tmp_path):
    denoiser = da.OptimalDenoiser.from_dataset(digits, temperature=0.7, chunk_size=100)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_path)
    loaded = da.AnalyticDDIMPipeline.from_pretrained(tmp_path).unet
    assert type(loaded) is da.OptimalDenoiser
    assert loaded.images.dtype == torch.uint8 and torch.equal(loaded.images, denoiser.images)
    assert torch.equal(loaded.labels, digits.labels) and loaded.config.temperature == 0.7
    x = torch.randn(3, 1, 8, 8)
    assert torch.equal(loaded.denoise(x, 600), denoiser.denoise(x, 600))


def test_stats_follow_in_place_changes(digits):
    denoiser = da.OptimalDenoiser.from_dataset(da.ImageSet(digits.images[:50]))
    x = torch.randn(2, 1, 8, 8)
    before = denoiser.denoise(x, 500)
    denoiser.images.copy_(digits.images[50:100])
    after = denoiser.denoise(x, 500)
    fresh = da.OptimalDenoiser.from_dataset(da.ImageSet(digits.images[50:100])).denoise(x, 500)
    assert not torch.allclose(before, after)
    torch.testing.assert_close(after, fresh)


def test_memorizes_training_images_end_to_end(digits):
    train = digits.images[:64]
    denoiser = da.OptimalDenoiser.from_dataset(train)
    pipe = da.AnalyticDDIMPipeline(unet=denoiser, scheduler=DDIMScheduler())
    samples = pipe(
        batch_size=6, num_inference_steps=50, generator=torch.Generator().manual_seed(0), output_type="pt"
    ).images
    samples = samples.double().reshape(6, -1) * 2 - 1  # [0, 1] -> model space
    y = train.double().reshape(64, -1) / 127.5 - 1
    rms = ((samples[:, None] - y[None]) ** 2).mean(-1).sqrt().min(dim=1).values
    assert (rms <= 1e-2).all(), rms


def test_online_softmax_flushes_subnormal_weights_exactly():
    logits = torch.tensor([[0.0, -95.0, -200.0, -1.0]])
    values = torch.tensor([[1.0], [2.0], [3.0], [4.0]])
    softmax = OnlineSoftmax()
    softmax.update(logits, lambda w: w @ values)
    ref = torch.softmax(logits.double(), 1) @ values.double()
    torch.testing.assert_close(softmax.result().double(), ref, rtol=1e-6, atol=0)


@pytest.mark.parametrize(
    "config, message",
    [
        ({"num_neighbors": 0}, "num_neighbors"),
        ({"num_neighbors": 1798}, "num_neighbors"),
        ({"chunk_size": 0}, "chunk_size"),
        ({"temperature": 0.0}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"faiss_index": "hnsw"}, "faiss_index"),
        ({"unknown_option": 1}, "unknown_option"),
    ],
)
def test_bad_config(digits, config, message):
    with pytest.raises(ValueError, match=message):
        da.OptimalDenoiser.from_dataset(digits, **config)


def test_bad_inputs(digits):
    denoiser = da.OptimalDenoiser.from_dataset(da.ImageSet(digits.images[:20]))
    with pytest.raises(ValueError, match="class_labels"):
        denoiser.denoise(torch.randn(2, 1, 8, 8), 10, class_labels=[0, 1])
    with pytest.raises(ValueError, match="storage_dtype"):
        da.OptimalDenoiser.from_dataset(digits, storage_dtype="int16")
    with pytest.raises(ValueError, match="uint8"):
        da.OptimalDenoiser.from_dataset(torch.zeros(3, 1, 8, 8), storage_dtype="uint8")
    with pytest.raises(ValueError, match="shape"):
        denoiser.denoise(torch.randn(2, 3, 8, 8), 10)
    with pytest.raises(ValueError, match="empty"):
        da.OptimalDenoiser.from_dataset(torch.zeros(0, 1, 8, 8))


@pytest.mark.parametrize("timestep", [999, 500, 30])
def test_plain_loop_matches_float64_brute_force(digits, digits_model_space, timestep):
    # The streamed loop that every device but the CPU runs, called directly on the CPU; with classes too.
    denoiser = da.OptimalDenoiser.from_dataset(digits, chunk_size=100)
    a = denoiser.alphas_cumprod[timestep]
    x = noisy_inputs(digits_model_space, a, 5, seed=timestep, from_data=True)
    a_b, one_minus_a_b = a.expand(5).clone(), (1 - a).expand(5).clone()
    stats = denoiser.image_stats()
    out = empirical.posterior_mean(x, a_b, one_minus_a_b, denoiser.images, stats, 100, cpu_fast_path=False)
    assert relative_error(out, brute_force_optimal(x, a, digits_model_space)) <= 1e-4
    labels = torch.tensor([3, 3, 7, 0, 9])
    out = empirical.posterior_mean(
        x,
        a_b,
        one_minus_a_b,
        denoiser.images,
        stats,
        100,
        labels=denoiser.labels,
        class_labels=labels,
        cpu_fast_path=False,
    )
    for b in range(5):
        members = digits_model_space[digits.labels == labels[b]]
        assert relative_error(out[b : b + 1], brute_force_optimal(x[b : b + 1], a, members)) <= 1e-4


@pytest.mark.parametrize("blocks", [3, 4])  # 1797 = 3 x 599 = 4 x 449 + 1 (a one-image tail block)
@pytest.mark.parametrize("storage_dtype", ["uint8", "float32"])
@pytest.mark.parametrize("timestep", [999, 500, 30])
def test_images_in_blocks_match_float64_brute_force(
    digits, digits_model_space, split_into_blocks, blocks, storage_dtype, timestep
):
    layouts = split_into_blocks(blocks)
    denoiser = da.OptimalDenoiser.from_dataset(digits, chunk_size=256, storage_dtype=storage_dtype)
    a = denoiser.alphas_cumprod[timestep]
    x = noisy_inputs(digits_model_space, a, 6, seed=timestep, from_data=True)
    threads = torch.get_num_threads()
    out = denoiser.denoise(x.reshape(6, 1, 8, 8), timestep)
    assert layouts[-1] == ([(0, 3, 599)] if blocks == 3 else [(0, 4, 449), (1796, 1, 1)])
    assert relative_error(out, brute_force_optimal(x, a, digits_model_space)) <= 1e-4
    assert torch.get_num_threads() == threads  # nothing process-wide is changed
    # a batch above SMALL_BATCH reads all images as one block
    big = torch.randn(empirical_cpu.SMALL_BATCH + 1, 1, 8, 8)
    denoiser.denoise(big, timestep)
    assert layouts[-1] == [(0, 1, 1797)]


def test_images_in_blocks_restrict_to_the_class(digits, digits_model_space, split_into_blocks):
    # digit 0 only in the first block: the other blocks hold no image of that class for sample 0
    layouts = split_into_blocks(3)
    order = torch.argsort((digits.labels != 0).long(), stable=True)
    data = da.ImageSet(digits.images[order], digits.labels[order])
    denoiser = da.OptimalDenoiser.from_dataset(data, chunk_size=128)
    labels = torch.tensor([0, 5, 5])
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(3))
    for timestep in (950, 200):
        out = denoiser.denoise(x.reshape(3, 1, 8, 8), timestep, class_labels=labels)
        assert layouts[-1] == [(0, 3, 599)]
        a = denoiser.alphas_cumprod[timestep]
        for b in range(3):
            members = digits_model_space[order][data.labels == labels[b]]
            assert relative_error(out[b : b + 1], brute_force_optimal(x[b : b + 1], a, members)) <= 1e-4


def test_concurrent_callers_get_the_serial_results(digits, split_into_blocks):
    # Two threads of the user's program denoise at once: no shared state is changed under them (thread counts
    # included), so each gets what it gets alone.
    from concurrent.futures import ThreadPoolExecutor

    split_into_blocks(3)
    denoiser = da.OptimalDenoiser.from_dataset(digits, chunk_size=256)
    x = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    calls = [900, 400, 900, 400, 30, 30]
    serial = [denoiser.denoise(x, t) for t in calls]
    threads = torch.get_num_threads()
    with ThreadPoolExecutor(3) as pool:
        concurrent = list(pool.map(lambda t: denoiser.denoise(x, t), calls))
    assert torch.get_num_threads() == threads
    for ours, theirs in zip(concurrent, serial):
        torch.testing.assert_close(ours, theirs, rtol=1e-6, atol=1e-7)
