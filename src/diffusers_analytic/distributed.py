r"""Several processes, one result: sharding and all-reduce helpers for `accelerate launch` / `torchrun` runs.

Three things scale out, and each gives the single-process result:

- **Generation** (`diffusers-analytic generate`): image i is seeded from `(seed, i)`, processes share out fixed batches
  of global indices. Nothing is reduced; see `commands/generate.py`.
- **Fitting statistics**: each process streams its shard of the data ([`shard_data`]) into float64 sums
  (count, sum, sum of outer products); [`all_reduce_moments`] adds them. Equal to one process to float64 rounding.
- **Data-parallel exact denoising** of the data-holding methods: each process keeps a contiguous share of the stored
  training images ([`shard_for_data_parallel`]) and all processes denoise the *same* batch. Softmax-weighted sums
  combine exactly through their partial online-softmax states ([`all_reduce_online_softmax`]: all-reduce MAX of the
  running max, rescale, all-reduce SUM of the running sum and weighted sum), nearest neighbours through
  (distance, index) pairs ([`all_reduce_nearest`]). Every process gets the full-data result (float32 rounding).

Collectives go through a small communicator with one method, `all_reduce(tensor, op) -> tensor` (`op` is `"sum"`,
`"max"` or `"min"`). [`ProcessGroupCommunicator`] uses `torch.distributed` (the process group that `accelerate`'s
`PartialState` or `torchrun` sets up: gloo on CPUs, NCCL on GPUs); tests may pass their own.

Launching N processes, on CPU-only and GPU machines alike (`accelerate launch --cpu --num_processes N` starts only
one process):

    accelerate launch --multi_gpu --num_processes N --num_machines 1 --mixed_precision no --dynamo_backend no \
        --main_process_port 0 -m diffusers_analytic generate ...        (or a script.py)
    torchrun --standalone --nproc_per_node N -m diffusers_analytic generate ...
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from diffusers.utils import logging

logger = logging.get_logger(__name__)

REDUCE_OPS = ("sum", "max", "min")


# ---------------------------------------------------------------------------------------------- communication
class Communicator(Protocol):
    """What the reductions need: this process's rank, the number of processes and an all-reduce."""

    rank: int
    world_size: int

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        """The elementwise `op` (`"sum"`, `"max"`, `"min"`) of `tensor` over all processes, on `tensor`'s device."""
        ...


class ProcessGroupCommunicator:
    """
    All-reduce over a `torch.distributed` process group (default: the global group that `accelerate launch` /
    `torchrun` set up). Tensors are reduced on the backend's device (CUDA for NCCL, CPU otherwise) and returned on
    the device they came from; the input is not modified.
    """

    def __init__(self, group: Any = None):
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise ValueError(
                "torch.distributed is not initialised; launch with `accelerate launch` or `torchrun` and create "
                "`accelerate.PartialState()` first."
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
        import torch.distributed as dist

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
    import torch.distributed as dist

    if state is not None and state.num_processes == 1:
        return None
    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return ProcessGroupCommunicator()


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
@dataclass
class DataShard:
    """
    This process's shard of a data source, for distributed fitting: fitting functions that stream moments
    ([`~diffusers_analytic.fitting.fit_moments`], hence `WienerDenoiser.from_dataset`) read `data` and all-reduce
    the sums, so every process ends with the statistics of the whole data set. Make one with [`shard_data`].

    Args:
        data: the shard itself (a tensor slice, an `ImageSet` slice, a `datasets` shard or an iterable of batches).
        index (`int`), num_shards (`int`): which shard of how many.
        communicator: how the sums are combined (a [`ProcessGroupCommunicator`] in a real run).
    """

    data: Any
    index: int
    num_shards: int
    communicator: Any = field(default=None, repr=False)


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
    >>> # under `accelerate launch --num_processes 2 ...`
    >>> from accelerate import PartialState
    >>> from diffusers_analytic.distributed import shard_data
    >>> denoiser = da.WienerDenoiser.from_dataset(shard_data(images, PartialState()))  # same on every process
    ```
    """
    import numpy as np

    from .data import ImageSet, is_hf_dataset

    if index is None or num_shards is None:
        if state is not None:
            index, num_shards = state.process_index, state.num_processes
        else:
            communicator = communicator or default_communicator()
            index, num_shards = (0, 1) if communicator is None else (communicator.rank, communicator.world_size)
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


def all_reduce_moments(moments, communicator: Communicator):
    r"""
    Combines the [`~diffusers_analytic.fitting.StreamingMoments`] of every process, in place; afterwards each
    process holds the moments of the whole data set.

    The sums are taken about a shift K that must be common before they can be added. The first process that saw any
    image lends its shift K_0 (with contiguous shards, its first batch is the data's first batch, so K_0 is the
    single-process shift), the others re-centre exactly (`StreamingMoments.recentre`), then count, sum and outer
    products are all-reduced (SUM) in float64.
    """
    world = communicator.world_size
    device = moments.sum.device
    # 1. the lowest rank that has images lends its shift
    has_images = moments.count > 0
    owner = communicator.all_reduce(torch.tensor([communicator.rank if has_images else world], device=device), "min")
    owner = int(owner.item())
    if owner == world:
        raise ValueError("No process has any image to fit on.")
    mine = moments.shift if communicator.rank == owner else torch.zeros_like(moments.sum)
    shift = communicator.all_reduce(mine, "sum")  # adding zeros: exact
    if has_images:
        moments.recentre(shift)
    else:
        moments.shift = shift
    # 2. n, s1 = sum (y - K), s2 = sum (y - K)(y - K)^T add across shards
    count = communicator.all_reduce(torch.tensor([moments.count], dtype=torch.int64, device=device), "sum")
    moments.count = int(count.item())
    moments.sum = communicator.all_reduce(moments.sum, "sum")
    moments.outer = communicator.all_reduce(moments.outer, "sum")
    return moments


# ---------------------------------------------------------------------------------------------- exact reductions
def all_reduce_online_softmax(
    state,
    communicator: Communicator,
    rows_shape: tuple[int, ...] | None = None,
    value_shape: tuple[int, ...] | None = None,
    device: torch.device | str | None = None,
):
    r"""
    Combines the partial [`~diffusers_analytic.models.functional.OnlineSoftmax`] states of all processes (each over
    its own images) into the state over all images, in place; `state.result()` is then the full-data softmax sum.

    With process r's running max m_r, sum s_r and weighted sum acc_r:

        m = max_r m_r                               (all-reduce MAX)
        s = sum_r exp(m_r - m) s_r,  acc = sum_r exp(m_r - m) acc_r     (all-reduce SUM, one call)

    exactly the rule `OnlineSoftmax.merge` applies to two states, so the result equals one process's to float32
    rounding. Rows where a process saw no finite logit (-inf max) contribute 0.

    Args:
        state (`OnlineSoftmax`): this process's state; may be empty (no chunk seen, e.g. no image of the requested
            class in this shard) if `rows_shape` and `value_shape` say what the others hold.
        communicator: see the module docstring.
        rows_shape (`tuple`, *optional*): `S`, the shape of the running max (e.g. `(B,)` or `(B, P)`).
        value_shape (`tuple`, *optional*): `V`, the trailing shape of the weighted sum (e.g. `(D,)` or `()`).
        device (*optional*): where an empty state's tensors are made.
    """
    shapes = None if rows_shape is None or value_shape is None else [(rows_shape, value_shape)]
    return all_reduce_online_softmaxes([state], communicator, shapes, device)[0]


def all_reduce_online_softmaxes(
    states: list, communicator: Communicator, shapes: list | None = None, device=None
) -> list:
    """
    [`all_reduce_online_softmax`] for several states at once (e.g. one per tile of output pixels), packed into one
    MAX and one SUM all-reduce whatever their number. `shapes` lists `(rows_shape, value_shape)` per state, needed
    only for states that may be empty.
    """
    for k, state in enumerate(states):
        if state.max is None:
            if shapes is None or shapes[k] is None:
                raise ValueError(
                    "This process's softmax state is empty (its shard had no matching image); pass `rows_shape` and "
                    "`value_shape` so that it can take part in the reduction."
                )
            rows_shape, value_shape = (tuple(shape) for shape in shapes[k])
            state.max = torch.full(rows_shape, float("-inf"), device=device)
            state.sum = torch.zeros(rows_shape, device=device)
            state.acc = torch.zeros((*rows_shape, *value_shape), device=device)
    # 1. the common running max of every row
    global_max = communicator.all_reduce(torch.cat([state.max.reshape(-1) for state in states]), "max")
    global_maxes = global_max.split([state.max.numel() for state in states])
    # 2. rescale each partial sum to it: exp(m_r - m), 0 where this process saw nothing (m_r = -inf)
    packed = []
    for state, state_global in zip(states, global_maxes):
        safe_global = torch.where(torch.isfinite(state_global), state_global, torch.zeros_like(state_global))
        scale = torch.exp(state.max.reshape(-1) - safe_global).reshape(state.max.shape)  # [*S]
        packed += [(state.sum * scale).reshape(-1), (state.acc * _expand(scale, state.acc)).reshape(-1)]
    # 3. add the rescaled sums (one call for all states)
    sizes = [part.numel() for part in packed]
    summed = communicator.all_reduce(torch.cat(packed), "sum").split(sizes)
    for k, (state, state_global) in enumerate(zip(states, global_maxes)):
        state.sum = summed[2 * k].reshape(state.sum.shape)
        state.acc = summed[2 * k + 1].reshape(state.acc.shape)
        state.max = state_global.reshape(state.max.shape)
    return states


def all_reduce_nearest(
    distances: torch.Tensor, indices: torch.Tensor, images: torch.Tensor, communicator: Communicator
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    r"""
    The global nearest neighbour from each process's own: per query b, the smallest distance over all processes,
    ties broken by the smallest global index (as `torch.argmin` does on one process), and that image.

        d* = min_r d_r          (all-reduce MIN)
        i* = min { i_r : d_r = d* }          (all-reduce MIN)
        y* = sum_r [i_r = i*] y_r            (all-reduce SUM of one non-zero term: exact)

    Args:
        distances (`torch.Tensor` `[B]`): this process's best distance per query (+inf if it has no candidate).
        indices (`torch.Tensor` `[B]` int64): the *global* index of that image.
        images (`torch.Tensor` `[B, ...]`): that image.

    Returns:
        `(distances, indices, images)` of the global winners, the same on every process.
    """
    sentinel = torch.iinfo(torch.int64).max
    best = communicator.all_reduce(distances, "min")  # [B]
    candidates = torch.where(
        distances == best, indices.to(torch.int64), torch.full_like(indices, sentinel, dtype=torch.int64)
    )
    winner = communicator.all_reduce(candidates, "min")  # [B]
    is_mine = (indices.to(torch.int64) == winner).reshape(-1, *([1] * (images.ndim - 1)))
    winner_images = communicator.all_reduce(torch.where(is_mine, images, torch.zeros_like(images)), "sum")
    return best, winner, winner_images


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(*values.shape, *([1] * (like.ndim - values.ndim)))


# ---------------------------------------------------------------------------------------------- data-parallel models
@dataclass
class DataParallelShard:
    """
    Which stored images a data-parallel denoiser kept: global indices `[start, stop)` of `num_images`, shard
    `index` of `num_shards`, and the communicator its reductions use.
    """

    index: int
    num_shards: int
    start: int
    stop: int
    num_images: int
    communicator: Any = field(default=None, repr=False)


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

    Supported: denoisers that declare their per-image buffers in `_data_parallel_buffers` (optimal, smoothed CFDM,
    nearest dataset and PCA locality), in their exact mode (not the FAISS top-k `num_neighbors` mode). A sharded
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
    >>> state = PartialState()
    >>> pipe = da.AnalyticDDIMPipeline.from_pretrained("optimal-cifar10")
    >>> shard_for_data_parallel(pipe, state).to(state.device)
    >>> images = pipe(batch_size=8, generator=generators_for_indices(0, range(8))).images  # same on every process
    ```
    """
    denoiser = getattr(model, "unet", model)
    buffer_names = getattr(type(denoiser), "_data_parallel_buffers", None)
    if not buffer_names or not hasattr(denoiser, "images"):
        raise ValueError(
            f"{type(denoiser).__name__} stores no training images to shard; data-parallel denoising applies to the "
            "data-holding denoisers (optimal, scfdm, nearest_dataset, pca_locality)."
        )
    if getattr(denoiser, "_data_parallel_shard", None) is not None:
        raise ValueError(f"This {type(denoiser).__name__} is already sharded ({denoiser._data_parallel_shard}).")
    if denoiser.config.get("num_neighbors") is not None:
        raise ValueError(
            f"Data-parallel denoising is exact only; this denoiser uses FAISS top-k (num_neighbors="
            f"{denoiser.config.num_neighbors}); load it exact with `from_pretrained(..., num_neighbors=None)`."
        )
    if index is None or num_shards is None:
        if state is not None:
            index, num_shards = state.process_index, state.num_processes
        else:
            communicator = communicator or default_communicator()
            index, num_shards = (0, 1) if communicator is None else (communicator.rank, communicator.world_size)
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
    # 1. Fix what depends on all the images before slicing: the class labels one may ask for, and the data mean
    #    the distances are centred on (shards must share it, else their logits differ by per-shard constants).
    known_labels = denoiser._known_labels()
    for value in list(vars(denoiser).values()):
        if hasattr(value, "pin_mean"):
            value.pin_mean(denoiser.images, int(denoiser.config.get("chunk_size", 1024)))
    # 2. Keep rows [start, stop) of every per-image buffer (a copy, so the full tensors can be freed).
    for name in buffer_names:
        buffer = getattr(denoiser, name, None)
        if buffer is None:
            continue
        if len(buffer) != num_images:
            raise ValueError(f"Buffer `{name}` has {len(buffer)} rows but there are {num_images} stored images.")
        setattr(denoiser, name, buffer[start:stop].clone())
    denoiser._known_labels = lambda: known_labels
    denoiser._data_parallel_shard = DataParallelShard(index, num_shards, start, stop, num_images, communicator)
    denoiser.save_pretrained = _refuse_to_save
    logger.info(f"Process {index} of {num_shards} holds stored images [{start}, {stop}) of {num_images}.")
    return model


def _refuse_to_save(*args, **kwargs):
    raise ValueError(
        "This denoiser was sharded for data-parallel denoising and holds only part of the images; save the "
        "unsharded model instead."
    )


def data_parallel_shard(denoiser) -> DataParallelShard | None:
    """The [`DataParallelShard`] of a sharded denoiser, None for an ordinary one."""
    return getattr(denoiser, "_data_parallel_shard", None)


def reduce_softmax_over_shards(denoiser, state, rows_shape=None, value_shape=None, device=None):
    """
    Hook for data-holding denoisers, called on the online-softmax state just before `result()`: a no-op for an
    ordinary denoiser; for a sharded one, [`all_reduce_online_softmax`] over all processes.
    """
    shard = data_parallel_shard(denoiser)
    if shard is None:
        return state
    return all_reduce_online_softmax(state, shard.communicator, rows_shape, value_shape, device)


def reduce_softmaxes_over_shards(denoiser, states: list, shapes: list | None = None, device=None) -> list:
    """[`reduce_softmax_over_shards`] for several states at once, in two all-reduces (see [`all_reduce_online_softmaxes`])."""
    shard = data_parallel_shard(denoiser)
    if shard is None:
        return states
    return all_reduce_online_softmaxes(states, shard.communicator, shapes, device)


def reduce_nearest_over_shards(denoiser, distances: torch.Tensor, indices: torch.Tensor, images: torch.Tensor):
    """
    Hook for the nearest-neighbour denoiser: `(distances [B], local indices [B], images [B, ...])` of this process's
    best candidates -> those of the global winners (indices global). A no-op for an ordinary denoiser.
    """
    shard = data_parallel_shard(denoiser)
    if shard is None:
        return distances, indices, images
    return all_reduce_nearest(distances, indices.to(torch.int64) + shard.start, images, shard.communicator)
