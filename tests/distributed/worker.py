r"""Run by the multi-process tests as 2 processes (gloo on CPU), with the launch form that works on CPU and GPU machines:

    python -m accelerate.commands.launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \
        --dynamo_backend no --main_process_port 0 -m tests.distributed.worker OUT WIENER_DIR DP_PIPELINE_DIR

(`torchrun --standalone --nproc_per_node 2 -m tests.distributed.worker ...` works too), from the repository root.

Each process does everything the single-process references in `test_multiprocess.py` are compared with:
DDIM and DDPM generation through the CLI, a distributed `fit`, distributed moments over a `datasets.Dataset` shard, and
data-parallel denoising with sharded stored images. Results go to files in OUT.
"""

from __future__ import annotations

import os
import sys

import torch
from accelerate import PartialState

import diffusers_analytic as da
from diffusers_analytic import distributed
from diffusers_analytic.commands.cli import main
from diffusers_analytic.distributed import (
    ProcessGroupCommunicator,
    shard_data,
    shard_for_data_parallel,
)
from diffusers_analytic.kernels import moments as moments_module
from diffusers_analytic.kernels.moments import fit_moments
from diffusers_analytic.kernels.reductions import all_reduce_nearest
from tests.distributed import dp_cases


def readme_example() -> str:
    """The README's Python example of data-parallel denoising (the code block that calls `shard_for_data_parallel`)."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    with open(os.path.join(root, "README.md"), encoding="utf-8") as f:
        blocks = f.read().split("```python\n")[1:]
    return next(block.split("```")[0] for block in blocks if "shard_for_data_parallel(pipe, state)" in block)


def run(out: str, wiener_dir: str, dp_pipeline_dir: str) -> None:
    # 0. the README's example, first, in the fresh process (it creates the PartialState): it must shard on CPU-only
    #    machines as on GPU machines
    namespace = {}
    exec(readme_example().replace("./optimal-cifar10", dp_pipeline_dir), namespace)
    shard = namespace["pipe"].unet.data_parallel_shard
    assert shard is not None and shard.num_shards == 2, shard
    torch.save(
        {"shard": (shard.index, shard.start, shard.stop), "images": [list(i.getdata()) for i in namespace["images"]]},
        os.path.join(out, f"readme_rank{shard.index}.pt"),
    )

    state = PartialState(cpu=True)
    rank = state.process_index
    assert state.num_processes == 2, state.num_processes

    # 1. generation through the CLI: 7 images in batches of 2, DDIM and the stochastic DDPM
    for scheduler in ("ddim", "ddpm"):
        code = main(
            [
                "generate",
                wiener_dir,
                "--num-images",
                "7",
                "--batch-size",
                "2",
                "--num-inference-steps",
                "4",
                "--output-dir",
                os.path.join(out, scheduler),
                "--seed",
                "3",
                "--scheduler",
                scheduler,
            ]
        )
        assert code == 0

    # 2. distributed fit through the CLI (each process streams its shard, the sums are all-reduced, the main process
    #    saves); count the all-reduces to be sure the fit was shared
    calls = []
    all_reduce_moments = moments_module.all_reduce_moments
    moments_module.all_reduce_moments = lambda moments, communicator: (
        calls.append(moments.count) or all_reduce_moments(moments, communicator)
    )
    code = main(
        [
            "fit",
            "--method",
            "wiener",
            "--data",
            "digits",
            "--output-dir",
            os.path.join(out, "fit"),
            "--batch-size",
            "100",
        ]
    )
    moments_module.all_reduce_moments = all_reduce_moments
    assert code == 0 and calls == [899 if rank == 0 else 898], calls
    # a data-holding method is fitted by the main process alone
    assert (
        main(["fit", "--method", "optimal", "--data", "digits", "--output-dir", os.path.join(out, "fit-optimal")]) == 0
    )

    # 3. moments of a datasets.Dataset, sharded with split_dataset_by_node
    dataset = dp_cases.digits_dataset()
    moments, _ = fit_moments(shard_data(dataset, state), batch_size=64, show_progress=False)
    if rank == 0:
        torch.save(
            {"count": moments.count, "mean": moments.mean, "cov": moments.covariance()},
            os.path.join(out, "moments.pt"),
        )

    # 4. data-parallel exact denoising: every data-holding denoiser case, sharded over the 2 processes
    results = {}
    for name, denoiser, inputs in dp_cases.cases():
        start, stop = distributed.shard_bounds(len(denoiser.images), rank, 2)
        shard_for_data_parallel(denoiser, state)
        assert len(denoiser.images) == stop - start, (name, len(denoiser.images))
        results[name] = [dp_cases.denoise(denoiser, *case) for case in inputs]
    torch.save(results, os.path.join(out, f"data_parallel_rank{rank}.pt"))

    # 5. nearest pairs: ties broken by the smallest global index whichever process holds it
    communicator = ProcessGroupCommunicator()
    distances = torch.tensor([1.0, 2.0, 3.0]) if rank == 0 else torch.tensor([1.0, 1.5, 5.0])
    indices = torch.tensor([7, 0, 1]) if rank == 0 else torch.tensor([4, 9, 8])
    images = torch.full((3, 2), float(rank + 1))
    best, winner, image = all_reduce_nearest(distances, indices, images, communicator)
    assert best.tolist() == [1.0, 1.5, 3.0] and winner.tolist() == [4, 9, 1], (best, winner)
    assert image[:, 0].tolist() == [2.0, 2.0, 1.0], image

    # 6. data-parallel generation through the CLI
    code = main(
        [
            "generate",
            dp_pipeline_dir,
            "--num-images",
            "3",
            "--batch-size",
            "2",
            "--num-inference-steps",
            "3",
            "--output-dir",
            os.path.join(out, "dp-generate"),
            "--data-parallel",
        ]
    )
    assert code == 0
    state.wait_for_everyone()


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2], sys.argv[3])
    print("worker done", da.__version__)
