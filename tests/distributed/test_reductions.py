"""In-process checks of the distributed building blocks: the same reduction code as a real run, with a threaded
communicator standing in for torch.distributed (the real 2-process runs are in test_multiprocess.py)."""

from __future__ import annotations

import pytest
import torch

import diffusers_analytic as da
from diffusers_analytic.data import DataShard
from diffusers_analytic.distributed import shard_bounds, shard_data, shard_for_data_parallel
from diffusers_analytic.kernels.moments import StreamingMoments, fit_moments
from diffusers_analytic.kernels.online_softmax import OnlineSoftmax
from diffusers_analytic.kernels.reductions import all_reduce_nearest, all_reduce_online_softmaxes

from . import dp_cases
from .dp_toys import ThreadGroup, ToyOptimalDenoiser


def float64_moments(images: torch.Tensor):
    flat = da.data.to_model_space(images, torch.float64).reshape(len(images), -1)
    mean = flat.mean(0)
    centred = flat - mean
    return mean, centred.T @ centred / (len(flat) - 1)


@pytest.mark.parametrize("num_items, num_shards", [(7, 2), (10, 3), (3, 3), (301, 4)])
def test_shard_bounds_partition_the_range(num_items, num_shards):
    bounds = [shard_bounds(num_items, index, num_shards) for index in range(num_shards)]
    assert bounds[0][0] == 0 and bounds[-1][1] == num_items
    assert all(stop == next_start for (_, stop), (next_start, _) in zip(bounds, bounds[1:]))
    sizes = [stop - start for start, stop in bounds]
    assert max(sizes) - min(sizes) <= 1


def test_recentre_and_merge_are_exact():
    images = torch.randn(90, 1, 4, 4, dtype=torch.float64) * 0.3 + 5.0  # a large mean: the shift matters
    mean, cov = float64_moments(images)
    parts = [images[:13], images[13:50], images[50:]]
    merged = StreamingMoments(16)
    for part in parts:
        moments = StreamingMoments(16)
        for batch in part.split(8):
            moments.update(batch)
        merged.merge(moments)
    assert merged.count == 90
    torch.testing.assert_close(merged.mean, mean, rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(merged.covariance(), cov, rtol=1e-11, atol=1e-13)
    merged.recentre(torch.zeros(16, dtype=torch.float64))
    torch.testing.assert_close(merged.covariance(), cov, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("world_size", [2, 3])
def test_sharded_fit_equals_single_process_fit(world_size):
    images = da.load_builtin("digits").images[:400]
    single, _ = fit_moments(images, batch_size=64, show_progress=False)

    def fit(rank, communicator):
        shard = shard_data(images, index=rank, num_shards=world_size, communicator=communicator)
        assert isinstance(shard, DataShard) and len(shard.data) in (400 // world_size, 400 // world_size + 1)
        return fit_moments(shard, batch_size=64, show_progress=False)[0]

    for moments in ThreadGroup(world_size).run(fit):
        assert moments.count == single.count
        torch.testing.assert_close(moments.mean, single.mean, rtol=0, atol=1e-14)
        torch.testing.assert_close(moments.covariance(), single.covariance(), rtol=0, atol=1e-14)


def test_sharded_wiener_from_dataset_equals_single_process():
    digits = da.load_builtin("digits")
    single = da.WienerDenoiser.from_dataset(digits, show_progress=False)

    def fit(rank, communicator):
        shard = shard_data(digits, index=rank, num_shards=2, communicator=communicator)
        return da.WienerDenoiser.from_dataset(shard, show_progress=False)

    for denoiser in ThreadGroup(2).run(fit):
        torch.testing.assert_close(denoiser.mean, single.mean, rtol=0, atol=0)
        torch.testing.assert_close(denoiser.eigvals, single.eigvals, rtol=1e-6, atol=1e-7)


def test_shard_data_single_process_and_errors():
    images = torch.zeros(3, 1, 2, 2)
    assert shard_data(images, index=0, num_shards=1) is images
    with pytest.raises(ValueError, match="Cannot shard 3 images over 4 processes"):
        shard_data(images, index=0, num_shards=4, communicator=object())
    with pytest.raises(ValueError, match="needs torch.distributed"):
        shard_data(images, index=0, num_shards=2)
    shard = shard_data(iter([images, images, images]), index=1, num_shards=2, communicator=object())
    assert len(list(shard.data)) == 1  # every other batch


def reference_softmax_sum(logits: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.double(), dim=-1) @ values.double()


@pytest.mark.parametrize("world_size", [2, 3])
def test_all_reduce_online_softmax_is_exact(world_size):
    generator = torch.Generator().manual_seed(0)
    logits = torch.randn(6, 50, generator=generator) * 30  # [B, N], peaked rows
    logits[2, :40] = float("-inf")  # row 2 only lives in the last images: early shards see nothing
    values = torch.randn(50, 5, generator=generator)  # [N, V]
    expected = reference_softmax_sum(logits, values)

    def reduce(rank, communicator):
        start, stop = shard_bounds(50, rank, world_size)
        state = OnlineSoftmax()
        for chunk_start in range(start, stop, 7):
            chunk = slice(chunk_start, min(chunk_start + 7, stop))
            state.update(logits[:, chunk], lambda w, chunk=chunk: w @ values[chunk])
        return all_reduce_online_softmaxes([state], communicator)[0].result()

    for result in ThreadGroup(world_size).run(reduce):
        assert dp_cases.relative_error(result, expected) < 1e-6


def test_all_reduce_online_softmax_with_an_empty_shard():
    logits, values = torch.randn(4, 9), torch.randn(9, 3)

    def state_of(rank) -> OnlineSoftmax:
        state = OnlineSoftmax()
        if rank == 1:  # rank 0 has no matching image at all
            state.update(logits, lambda w: w @ values)
        return state

    with pytest.raises(ValueError, match="pass its `\\(rows_shape, value_shape\\)`"):
        all_reduce_online_softmaxes([OnlineSoftmax()], ThreadGroup(1).communicator(0))
    results = ThreadGroup(2).run(
        lambda rank, communicator: all_reduce_online_softmaxes([state_of(rank)], communicator, [((4,), (3,))])[
            0
        ].result()
    )
    for result in results:
        assert dp_cases.relative_error(result, reference_softmax_sum(logits, values)) < 1e-6


def test_all_reduce_online_softmaxes_packs_several_states():
    """Per-pixel states of different shapes (tiles of PCA locality), one of them empty on one rank: two collectives."""
    generator = torch.Generator().manual_seed(3)
    tiles = [torch.randn(2, 3, 20, generator=generator) * 10, torch.randn(2, 5, 20, generator=generator)]  # [B, P, N]
    values = [torch.randn(3, 20, generator=generator), torch.randn(5, 20, generator=generator)]  # [P, N]
    expected = [
        (torch.softmax(tiles[0].double(), -1) * values[0].double()).sum(-1),  # [B, P]
        (torch.softmax(tiles[1][..., 12:].double(), -1) * values[1][:, 12:].double()).sum(-1),  # rank 1's images only
    ]
    calls = []

    def reduce(rank, communicator):
        all_reduce = communicator.all_reduce
        communicator.all_reduce = lambda tensor, op: calls.append(op) or all_reduce(tensor, op)
        states = [OnlineSoftmax(), OnlineSoftmax()]
        for k, (logits, vals) in enumerate(zip(tiles, values)):
            chunk = slice(0, 12) if rank == 0 else slice(12, 20)
            if rank == 0 and k == 1:
                continue  # nothing for tile 1 on rank 0
            states[k].update(logits[..., chunk], lambda w, vals=vals[:, chunk]: (w * vals).sum(-1))
        shapes = [((2, 3), ()), ((2, 5), ())]
        return [state.result() for state in all_reduce_online_softmaxes(states, communicator, shapes)]

    for results in ThreadGroup(2).run(reduce):
        for result, reference in zip(results, expected):
            assert dp_cases.relative_error(result, reference) < 1e-6
    assert calls == ["max", "max", "sum", "sum"]  # 2 ranks x (one MAX, one SUM)


def test_all_reduce_nearest_breaks_ties_by_global_index():
    # per rank: (best distance, global index, image) for 3 queries
    distances = [torch.tensor([1.0, 2.0, 0.5]), torch.tensor([1.0, 1.0, 0.5]), torch.tensor([3.0, 1.0, float("inf")])]
    indices = [torch.tensor([10, 3, 4]), torch.tensor([2, 30, 40]), torch.tensor([50, 60, 0])]

    def reduce(rank, communicator):
        images = torch.full((3, 2, 2), float(rank))
        return all_reduce_nearest(distances[rank], indices[rank], images, communicator)

    for best, winner, images in ThreadGroup(3).run(reduce):
        assert best.tolist() == [1.0, 1.0, 0.5]
        assert winner.tolist() == [2, 30, 4]  # query 1: a tie between index 30 (rank 1) and 60 (rank 2)
        assert images[:, 0, 0].tolist() == [1.0, 1.0, 0.0]


def test_data_parallel_denoisers_equal_single_process():
    """Every data-holding denoiser, its images split over 2 (threaded) processes, gives the full-data x0_hat."""
    cases = dp_cases.cases()
    expected = {name: [dp_cases.denoise(denoiser, *case) for case in inputs] for name, denoiser, inputs in cases}

    def denoise(rank, communicator):
        results = {}
        for name, denoiser, inputs in dp_cases.cases():
            start, stop = shard_bounds(len(denoiser.images), rank, 2)
            shard_for_data_parallel(denoiser, index=rank, num_shards=2, communicator=communicator)
            assert len(denoiser.images) == stop - start
            results[name] = [dp_cases.denoise(denoiser, *case) for case in inputs]
        return results

    for results in ThreadGroup(2).run(denoise):
        for name, _, _ in cases:
            for result, reference in zip(results[name], expected[name]):
                tolerance = 0 if name == "nearest" else 1e-5  # nearest returns a stored image: bit-identical
                assert dp_cases.relative_error(result, reference) <= tolerance, name


def test_one_shard_alone_is_a_different_posterior():
    """Without the reduction a shard computes the posterior of its half of the data: the reduction matters."""
    reference = dp_cases.toy_optimal()
    x_t, t, _ = dp_cases.noisy_inputs(reference, dp_cases.digits_images())[1]
    half = ToyOptimalDenoiser(num_images=150)
    half.images.copy_(reference.images[151:])
    assert dp_cases.relative_error(half.denoise(x_t, t), reference.denoise(x_t, t)) > 1e-2


def test_shard_for_data_parallel_refuses_what_it_cannot_do(tmp_path):
    with pytest.raises(ValueError, match="stores no training images"):
        shard_for_data_parallel(
            da.WienerDenoiser(sample_size=4, in_channels=1), index=0, num_shards=2, communicator=object()
        )
    denoiser = dp_cases.toy_optimal()
    with pytest.raises(ValueError, match="needs a communicator"):
        shard_for_data_parallel(denoiser, index=0, num_shards=2)
    assert shard_for_data_parallel(denoiser, index=0, num_shards=1) is denoiser and len(denoiser.images) == 301
    shard_for_data_parallel(denoiser, index=1, num_shards=2, communicator=object())
    with pytest.raises(ValueError, match="already sharded"):
        shard_for_data_parallel(denoiser, index=1, num_shards=2, communicator=object())
    with pytest.raises(ValueError, match="holds only part of the images"):
        da.AnalyticDDIMPipeline(unet=denoiser).save_pretrained(str(tmp_path / "shard"))
    topk = da.OptimalDenoiser.from_dataset(dp_cases.digits_images(), num_neighbors=5, show_progress=False)
    with pytest.raises(ValueError, match="exact only"):
        shard_for_data_parallel(topk, index=0, num_shards=2, communicator=object())
    with pytest.raises(ValueError, match="Cannot shard 301 stored images over 400"):
        shard_for_data_parallel(dp_cases.toy_optimal(), index=0, num_shards=400, communicator=object())
