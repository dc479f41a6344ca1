"""Two real processes (gloo on CPU) against one: generation, fitting and data-parallel denoising give the same results.

One launch in all, to keep CI short: `accelerate launch` (the form that works on CPU-only and GPU machines) runs
`worker.py`, which drives the CLI and the library in the same two processes; the references are computed here, in
one process.
"""

from __future__ import annotations

import os

import pytest
import torch

import diffusers_analytic as da
from diffusers_analytic.commands.cli import main
from diffusers_analytic.kernels.moments import fit_moments

from . import dp_cases
from .launching import accelerate_launch, run_launched

NUM_IMAGES = 7  # not divisible by 2 processes, nor by the batch sizes


def png_bytes(output_dir, count: int = NUM_IMAGES) -> list[bytes]:
    return [open(os.path.join(output_dir, f"{i:06d}.png"), "rb").read() for i in range(count)]


def generate_single(source: str, output_dir: str, *extra: str) -> None:
    assert main(["generate", source, "--output-dir", output_dir, *extra]) == 0


@pytest.fixture(scope="module")
def worker_out(tmp_path_factory, wiener_dir, optimal_dir) -> str:
    out = str(tmp_path_factory.mktemp("worker"))
    result = run_launched(accelerate_launch(["-m", "tests.distributed.worker", out, wiener_dir, optimal_dir]), cwd=out)
    assert result.stdout.count("worker done") == 2  # the worker checks that the work really was shared
    return out


@pytest.mark.parametrize("scheduler", ["ddim", "ddpm"])
def test_two_processes_generate_the_same_files_as_one(worker_out, wiener_dir, tmp_path, scheduler):
    one = str(tmp_path / "one")
    generate_single(
        wiener_dir,
        one,
        "--num-images",
        str(NUM_IMAGES),
        "--batch-size",
        "3",
        "--num-inference-steps",
        "4",
        "--seed",
        "3",
        "--scheduler",
        scheduler,
    )
    two = os.path.join(worker_out, scheduler)
    assert png_bytes(two) == png_bytes(one)
    assert sorted(os.listdir(two)) == sorted(os.listdir(one))  # grid, manifest, no temporary files left


def test_distributed_fit_equals_one_process(worker_out, tmp_path):
    assert main(["fit", "--method", "wiener", "--data", "digits", "--output-dir", str(tmp_path / "fit")]) == 0
    one = da.WienerDenoiser.from_pretrained(str(tmp_path / "fit" / "unet"))
    two = da.WienerDenoiser.from_pretrained(os.path.join(worker_out, "fit", "unet"))
    # float32 buffers of float64 statistics that agree to float64 rounding
    torch.testing.assert_close(two.mean, one.mean, rtol=0, atol=0)
    torch.testing.assert_close(two.eigvals, one.eigvals, rtol=1e-6, atol=1e-7)
    cov = lambda d: (d.eigvecs.double() * d.eigvals.double()) @ d.eigvecs.double().T  # noqa: E731
    torch.testing.assert_close(cov(two), cov(one), rtol=0, atol=1e-6)


def test_data_holding_fit_under_two_processes(worker_out):
    denoiser = da.OptimalDenoiser.from_pretrained(os.path.join(worker_out, "fit-optimal", "unet"))
    assert torch.equal(denoiser.images, da.load_builtin("digits").images)


def test_distributed_moments_of_a_datasets_dataset(worker_out):
    single, _ = fit_moments(dp_cases.digits_dataset(), batch_size=64, show_progress=False)
    two = torch.load(os.path.join(worker_out, "moments.pt"))
    assert two["count"] == single.count == 500
    torch.testing.assert_close(two["mean"], single.mean, rtol=0, atol=1e-14)
    torch.testing.assert_close(two["cov"], single.covariance(), rtol=0, atol=1e-14)


def test_readme_python_example_shards_over_two_cpu_processes(worker_out):
    ranks = [torch.load(os.path.join(worker_out, f"readme_rank{rank}.pt")) for rank in (0, 1)]
    assert [r["shard"] for r in ranks] == [(0, 0, 151), (1, 151, 301)]  # each process holds half of the 301 images
    assert ranks[0]["images"] == ranks[1]["images"]  # and both return the same images


def test_a_state_that_misses_the_launched_processes_is_refused(optimal_dir, monkeypatch):
    from types import SimpleNamespace

    from diffusers_analytic.distributed import shard_data, shard_for_data_parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    lone = SimpleNamespace(num_processes=1, process_index=0)  # what PartialState() says there without GPUs
    pipe = da.AnalyticDDIMPipeline.from_pretrained(optimal_dir)
    for call in (lambda: shard_for_data_parallel(pipe, lone), lambda: shard_data(torch.zeros(4, 1, 2, 2), lone)):
        with pytest.raises(ValueError, match=r"started 2 processes.*PartialState\(cpu=True\)"):
            call()


def test_data_parallel_denoising_equals_one_process(worker_out):
    ranks = [torch.load(os.path.join(worker_out, f"data_parallel_rank{rank}.pt")) for rank in (0, 1)]
    for name, denoiser, inputs in dp_cases.cases():
        expected = [dp_cases.denoise(denoiser, *case) for case in inputs]
        for got0, got1, reference in zip(ranks[0][name], ranks[1][name], expected):
            assert torch.equal(got0, got1), name  # every process holds the same result
            tolerance = 0 if name == "nearest" else 1e-5
            assert dp_cases.relative_error(got0, reference) <= tolerance, name


def test_data_parallel_generate_equals_one_process(worker_out, optimal_dir, tmp_path):
    one = str(tmp_path / "one")
    generate_single(optimal_dir, one, "--num-images", "3", "--batch-size", "3", "--num-inference-steps", "3")
    assert png_bytes(os.path.join(worker_out, "dp-generate"), 3) == png_bytes(one, 3)
