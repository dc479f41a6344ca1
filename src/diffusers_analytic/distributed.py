r"""Several processes, one result: sharding and all-reduce helpers for `accelerate launch` / `torchrun` runs.

Three things scale out, and each gives the single-process result:

- **Generation** (`diffusers-analytic generate`): image i is seeded from `(seed, i)`, processes share out fixed batches
  of global indices. Nothing is reduced; see `commands/generate.py`.
- **Fitting statistics**: each process streams its shard of the data ([`shard_data`]) into float64 sums
  (count, sum, sum of outer products); `kernels.moments.all_reduce_moments` adds them. Equal to one process to float64 rounding.
- **Data-parallel exact denoising** of the data-holding methods: each process keeps a contiguous share of the stored
  training images ([`shard_for_data_parallel`]) and all processes denoise the *same* batch. Softmax-weighted sums
  combine exactly through their partial online-softmax states (all-reduce MAX of the running max, rescale, all-reduce
  SUM of the running sum and weighted sum), nearest neighbours through (distance, index) pairs; see
  `kernels.reductions`. The denoiser keeps its shard as an attached [`DataParallelShard`] and calls the reductions
  itself (`models.stored_images.StoredImagesMixin`). Every process gets the full-data result (float32 rounding).

Collectives go through a small communicator with one method, `all_reduce(tensor, op) -> tensor` (`op` is `"sum"`,
`"max"` or `"min"`; the protocol `kernels.reductions.Communicator`). [`ProcessGroupCommunicator`] uses
`torch.distributed` (the process group that `accelerate`'s `PartialState` or `torchrun` sets up: gloo on CPUs, NCCL
on GPUs); tests may pass their own.

Launching N processes, on CPU-only and GPU machines alike (`accelerate launch --cpu --num_processes N` starts only
one process):

    accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no \
        --main_process_port 0 -m diffusers_analytic generate ...        (or a script.py)
    torchrun --standalone --nproc_per_node N -m diffusers_analytic generate ...
"""

from __future__ import annotations

import itertools
import os
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from diffusers.utils import logging

from .data import DataShard, ImageSet, is_hf_dataset
from .kernels.reductions import REDUCE_OPS, Communicator
from .models.stored_images import DataParallelShard, StoredImagesMixin

logger = logging.get_logger(__name__)

__all__ = [
    "Communicator",
    "DataParallelShard",
    "DataShard",
    "ProcessGroupCommunicator",
    "default_communicator",
    "shard_bounds",
    "shard_data",
    "shard_for_data_parallel",
]


# ---------------------------------------------------------------------------------------------- communication
class ProcessGroupCommunicator:
    """
    All-reduce over a `torch.distributed` process group (default: the global group that `accelerate launch` /
    `torchrun` set up). Tensors are reduced on the backend's device (CUDA for NCCL, CPU otherwise) and returned on
    the device they came from; the input is not modified.
    """

    def __init__(self, group: Any = None):
        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialised; launch with `accelerate launch` or `torchrun` and create "
                "`accelerate.PartialState(cpu=not torch.cuda.is_available())` first."
            )
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self._ops = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}
        if "nccl" in str(dist.get_backend(group)):  # "nccl", or a mixed "cpu:gloo,cuda:nccl"
            self.device = torch.device("cuda", torch.cuda.current_device())
        else:
            self.device = torch.device("cpu")

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        if op not in self._ops:
            raise ValueError(f"`op` must be one of {REDUCE_OPS}, got {op!r}.")
        buffer = tensor.detach().to(self.device, copy=True).contiguous()
        dist.all_reduce(buffer, self._ops[op], group=self.group)
        return buffer.to(tensor.device)


def default_communicator(state: Any = None) -> Communicator | None:
    """
    The communicator of the current run: None for a single process, else a [`ProcessGroupCommunicator`] on the
    default group. `state` (an `accelerate.PartialState`) is optional; it only has to exist so the group is set up.
    """
    if state is not None and state.num_processes == 1:
        return None
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return ProcessGroupCommunicator()


def _process_index_and_count(state: Any, communicator) -> tuple[int, int, Any]:
    """
    `(index, num_shards, communicator)` from an `accelerate.PartialState` or, without one, the default process group.
    A state that reports one process while the launcher started several (`WORLD_SIZE`) is a ValueError with the fix:
    `PartialState()` on a machine without GPUs does not join `accelerate launch --multi_gpu`'s processes.
    """
    if state is not None:
        launched = int(os.environ.get("WORLD_SIZE", "1") or 1)
        if state.num_processes == 1 and launched > 1:
            raise ValueError(
                f"The launcher started {launched} processes but the PartialState reports 1, so every process would "
                "keep all the data; on a machine without GPUs create it with `PartialState(cpu=True)` (e.g. "
                "`PartialState(cpu=not torch.cuda.is_available())`)."
            )
        return state.process_index, state.num_processes, communicator
    communicator = communicator or default_communicator()
    if communicator is None:
        return 0, 1, None
    return communicator.rank, communicator.world_size, communicator


def shard_bounds(num_items: int, index: int, num_shards: int) -> tuple[int, int]:
    """
    `[start, stop)` of shard `index` when `num_items` are cut into `num_shards` contiguous shards; the first
    `num_items % num_shards` shards get one item more (the split of `accelerate`'s `split_between_processes`).
    """
    if num_shards < 1 or not 0 <= index < num_shards:
        raise ValueError(f"Shard `index` must be in [0, {num_shards}) with `num_shards` >= 1, got {index}.")
    per_shard, extras = divmod(num_items, num_shards)
    start = index * per_shard + min(index, extras)
    return start, start + per_shard + (1 if index < extras else 0)


# ---------------------------------------------------------------------------------------------- sharded data
def shard_data(data, state: Any = None, index: int | None = None, num_shards: int | None = None, communicator=None):
    """
    This process's shard of `data` for a distributed fit, or `data` itself in a single-process run.

    - a tensor / array / `ImageSet`: a contiguous slice ([`shard_bounds`]), labels sliced alike;
    - a `datasets.Dataset` or `IterableDataset`: `datasets.distributed.split_dataset_by_node` (contiguous for
      map-style sets; whole shards or every n-th example for iterable ones);
    - any other iterable of batches: every `num_shards`-th batch, starting at batch `index`.

    Args:
        data: a source [`~diffusers_analytic.data.iter_image_batches`] reads.
        state (`accelerate.PartialState`, *optional*): gives `index` and `num_shards` (process index and count).
        index (`int`, *optional*), num_shards (`int`, *optional*): explicit shard, instead of `state` / the default
            process group.
        communicator (*optional*): overrides the default [`ProcessGroupCommunicator`].

    Returns:
        A [`DataShard`] (or `data` unchanged when there is one process).

    Examples:

    ```py
    >>> # under `accelerate launch --multi_gpu --num_processes 2 ...` (the form in the module docstring)
    >>> from accelerate import PartialState
    >>> from diffusers_analytic.distributed import shard_data
    >>> state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines, NCCL on GPUs
    >>> denoiser = da.WienerDenoiser.from_dataset(shard_data(images, state))  # same on every process
    ```
    """
    if index is None or num_shards is None:
        index, num_shards, communicator = _process_index_and_count(state, communicator)
    if num_shards == 1:
        return data
    if communicator is None:
        communicator = default_communicator(state)
    if communicator is None:
        raise ValueError(
            f"Sharding over {num_shards} processes needs torch.distributed (launch with `accelerate launch` or "
            "`torchrun`) or an explicit `communicator`; a lone shard would fit only part of the data."
        )
    if isinstance(data, np.ndarray):
        data = torch.from_numpy(data)
    if isinstance(data, (torch.Tensor, ImageSet)):
        if len(data) < num_shards:
            raise ValueError(f"Cannot shard {len(data)} images over {num_shards} processes; use fewer processes.")
        start, stop = shard_bounds(len(data), index, num_shards)
        if isinstance(data, ImageSet):
            labels = None if data.labels is None else data.labels[start:stop]
            shard = ImageSet(data.images[start:stop], labels, data.name)
        else:
            shard = data[start:stop]
    elif is_hf_dataset(data):
        from datasets.distributed import split_dataset_by_node

        if hasattr(data, "__len__") and len(data) < num_shards:
            raise ValueError(f"Cannot shard {len(data)} images over {num_shards} processes; use fewer processes.")
        shard = split_dataset_by_node(data, rank=index, world_size=num_shards)
    else:
        shard = itertools.islice(data, index, None, num_shards)
    return DataShard(shard, index, num_shards, communicator)


# ---------------------------------------------------------------------------------------------- data-parallel models
def shard_for_data_parallel(
    model, state: Any = None, index: int | None = None, num_shards: int | None = None, communicator=None
):
    r"""
    Data-parallel exact denoising: keep only this process's contiguous share of a data-holding denoiser's stored
    images; from then on each `denoise` / `forward` call combines the partial results of all processes (online-softmax
    states, nearest-neighbour candidates) by all-reduce, so every process returns the exact full-data x0_hat.

    Every process must then make the same calls with the same inputs (run the same pipeline with the same
    generators); the outputs are identical on all processes. This is how a data set larger than one device's memory
    is served: each GPU holds 1/n of the images, and a step costs 1/n of the distance computations plus two small
    all-reduces.

    Supported: the data-holding denoisers with `supports_data_parallel` (optimal, smoothed CFDM, nearest dataset and
    PCA locality), in their exact mode (not the FAISS top-k `num_neighbors` mode). A sharded
    denoiser cannot be saved (it holds a part of the data); save the original.

    Args:
        model: a denoiser, or a pipeline whose `unet` is one (sharded in place).
        state (`accelerate.PartialState`, *optional*): process index and count; default: the `torch.distributed`
            default group.
        index (`int`, *optional*), num_shards (`int`, *optional*), communicator (*optional*): an explicit shard and
            communicator instead (tests, or a sub-group).

    Returns:
        `model`, sharded in place.

    Examples:

    ```py
    >>> # accelerate launch --num_processes 4 serve.py  (each GPU holds a quarter of the images)
    >>> from accelerate import PartialState
    >>> from diffusers_analytic.distributed import shard_for_data_parallel
    >>> from diffusers_analytic.utils.seeding import generators_for_indices
    >>> state = PartialState(cpu=not torch.cuda.is_available())  # gloo on CPU-only machines, NCCL on GPUs
    >>> pipe = da.AnalyticDDIMPipeline.from_pretrained("optimal-cifar10")
    >>> shard_for_data_parallel(pipe, state).to(state.device)
    >>> images = pipe(batch_size=8, generator=generators_for_indices(0, range(8))).images  # same on every process
    ```
    """
    denoiser = getattr(model, "unet", model)
    if not isinstance(denoiser, StoredImagesMixin) or not denoiser.supports_data_parallel:
        raise ValueError(
            f"{type(denoiser).__name__} stores no training images to shard; data-parallel denoising applies to the "
            "data-holding denoisers (optimal, scfdm, nearest_dataset, pca_locality)."
        )
    if index is None or num_shards is None:
        index, num_shards, communicator = _process_index_and_count(state, communicator)
    if num_shards == 1:
        return model
    communicator = communicator or default_communicator(state)
    if communicator is None:
        raise ValueError(
            f"Sharding over {num_shards} processes needs a communicator; torch.distributed is not initialised."
        )
    num_images = len(denoiser.images)
    if num_images < num_shards:
        raise ValueError(f"Cannot shard {num_images} stored images over {num_shards} processes; use fewer processes.")
    start, stop = shard_bounds(num_images, index, num_shards)
    denoiser.keep_image_shard(DataParallelShard(index, num_shards, start, stop, num_images, communicator))
    logger.info(f"Process {index} of {num_shards} holds stored images [{start}, {stop}) of {num_images}.")
    return model
