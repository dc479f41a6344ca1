"""Pure math shared by several denoisers: the online (streaming) softmax and chunked access to stored images."""

from __future__ import annotations

import math
import os
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from ..data import iter_image_batches, to_model_space

STORAGE_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}


class OnlineSoftmax:
    r"""
    Exact softmax-weighted sums over logits that arrive in chunks (Milakov & Gimelshein 2018).

    For logits l_i and values v_i it keeps the running max m, the running sum s = sum_i exp(l_i - m) and the running
    weighted sum acc = sum_i exp(l_i - m) v_i; after all chunks, `result()` = acc / s = sum_i softmax(l)_i v_i,
    equal to the one-shot softmax to floating-point rounding whatever the chunking. Partial states of disjoint chunks
    combine with `merge` (or an all-reduce of max, then sums), which is how data-parallel shards are combined.

    Shapes: logits `[*S, n]` per chunk (`S` the shape of the softmax rows, e.g. `[B]` or `[B, P]`), the weighted
    sum `[*S, *V]` (`V` may be empty).
    """

    def __init__(self):
        self.max: torch.Tensor | None = None  # m    [*S]
        self.sum: torch.Tensor | None = None  # s    [*S]
        self.acc: torch.Tensor | None = None  # acc  [*S, *V]

    def update(self, logits: torch.Tensor, weighted_sum: Callable[[torch.Tensor], torch.Tensor]) -> None:
        """
        Adds one chunk: `logits` `[*S, n]`; `weighted_sum(w)` maps the chunk's unnormalised weights `w` `[*S, n]`
        (already shifted by the new running max) to `sum_i w_i v_i` `[*S, *V]`.
        """
        chunk_max = logits.amax(dim=-1)
        new_max = chunk_max if self.max is None else torch.maximum(self.max, chunk_max)
        # -inf rows (no finite logit yet) must not produce inf - inf.
        safe_max = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        weights = torch.exp(logits - safe_max.unsqueeze(-1))
        # Flush weights below the smallest normal float to 0 (relative change < 1e-37): subnormal operands make CPU
        # GEMMs in `weighted_sum` 5-10x slower.
        weights.masked_fill_(weights < torch.finfo(weights.dtype).tiny, 0.0)
        chunk_sum = weights.sum(dim=-1)
        chunk_acc = weighted_sum(weights)
        if self.max is None:
            self.max, self.sum, self.acc = new_max, chunk_sum, chunk_acc
            return
        old_safe = torch.where(torch.isfinite(self.max), self.max, safe_max)
        scale = torch.exp(old_safe - safe_max)
        self.sum = self.sum * scale + chunk_sum
        self.acc = self.acc * _expand(scale, self.acc) + chunk_acc
        self.max = new_max

    def merge(self, other: OnlineSoftmax) -> None:
        """Combines the state of a disjoint set of chunks into this one (exact)."""
        if other.max is None:
            return
        if self.max is None:
            self.max, self.sum, self.acc = other.max, other.sum, other.acc
            return
        new_max = torch.maximum(self.max, other.max)
        safe = torch.where(torch.isfinite(new_max), new_max, torch.zeros_like(new_max))
        scale_self = torch.exp(torch.where(torch.isfinite(self.max), self.max, safe) - safe)
        scale_other = torch.exp(torch.where(torch.isfinite(other.max), other.max, safe) - safe)
        self.sum = self.sum * scale_self + other.sum * scale_other
        self.acc = self.acc * _expand(scale_self, self.acc) + other.acc * _expand(scale_other, other.acc)
        self.max = new_max

    def result(self) -> torch.Tensor:
        """acc / s: the softmax-weighted sum over every chunk seen."""
        if self.max is None:
            raise ValueError("OnlineSoftmax.result() called before any chunk was added.")
        return self.acc / _expand(self.sum, self.acc)


def _expand(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return values.reshape(*values.shape, *([1] * (like.ndim - values.ndim)))


# ---------------------------------------------------------------------------------------------- stored images
def collect_images(
    data,
    storage_dtype: str = "auto",
    batch_size: int = 1024,
    **data_kwargs,
) -> tuple[torch.Tensor, torch.Tensor | None, str]:
    """
    Reads all images of `data` (anything `iter_image_batches` accepts) into one tensor for storage.

    Args:
        storage_dtype (`str`): `"auto"` keeps 8-bit sources as uint8 `[0, 255]` (exact, 4x smaller than float32) and
            stores float sources as float32; `"uint8"` requires an 8-bit source; `"float16"` / `"float32"` store
            model-space values (float16 rounds to about 1e-3 relative).

    Returns:
        `(images [N, C, H, W], labels [N] int64 or None, storage dtype name)`.
    """
    if storage_dtype not in ("auto", *STORAGE_DTYPES):
        raise ValueError(f"`storage_dtype` must be 'auto' or one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}.")
    batches = list(iter_image_batches(data, batch_size=batch_size, **data_kwargs))
    shapes = {tuple(b.images.shape[1:]) for b in batches}
    if len(shapes) > 1:
        raise ValueError(f"All images must have the same shape; got {sorted(shapes)}.")
    all_uint8 = all(b.images.dtype == torch.uint8 for b in batches)
    if storage_dtype == "auto":
        storage_dtype = "uint8" if all_uint8 else "float32"
    if storage_dtype == "uint8" and not all_uint8:
        raise ValueError("`storage_dtype='uint8'` needs an 8-bit source (uint8 images); this data is floating point.")
    if storage_dtype == "uint8":
        images = torch.cat([b.images for b in batches])
    else:
        images = torch.cat([to_model_space(b.images, STORAGE_DTYPES[storage_dtype]) for b in batches])
    has_labels = [b.labels is not None for b in batches]
    if any(has_labels) and not all(has_labels):
        raise ValueError("Some batches have labels and others do not.")
    labels = torch.cat([b.labels for b in batches]).long() if all(has_labels) else None
    return images, labels, storage_dtype


def image_chunks(
    images: torch.Tensor, chunk_size: int, indices: torch.Tensor | None = None, device=None
) -> Iterator[tuple[int, torch.Tensor]]:
    """
    Yields `(offset, chunk)` with `chunk` float32 `[n, D]` in model space, converted from the stored dtype one chunk at
    a time (never all images at once). `indices` selects a subset (e.g. one class); offsets index into it.
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    total = len(images) if indices is None else len(indices)
    for start in range(0, total, chunk_size):
        stop = min(start + chunk_size, total)
        chunk = images[start:stop] if indices is None else images[indices[start:stop]]
        if device is not None:
            chunk = chunk.to(device)
        yield start, to_model_space(chunk.reshape(stop - start, -1), torch.float32)


# ---------------------------------------------------------------------------------------------- data-holding denoisers
# The optimal (empirical Bayes), smoothed CFDM and nearest-dataset denoisers keep the training images y_1 .. y_N as a
# buffer and stream over it in chunks; the math below is shared by importing these functions.
#
# Streaming form of the logits. With mu the data mean, x' = x_t - sqrt(a) mu and y'_i = y_i - mu,
#     -||x_t - sqrt(a) y_i||^2 / (2 (1 - a) tau) = c1 x'.y'_i - c2 ||y'_i||^2 + (terms without i),
#     c1 = sqrt(a) / ((1 - a) tau),   c2 = a / (2 (1 - a) tau),
# and terms without i cancel in the softmax. A stored value r (uint8 0..255, or a float in model space) maps to
# y = s r + o (uint8: s = 1/127.5, o = -1; floats: s = 1, o = 0), so x'.y'_i = s x'.r_i + (terms without i): the GEMM
# runs on the stored values cast to float32 (no per-element affine pass, and float32 storage is used in place), and
# sum_i w_i y_i = s sum_i w_i r_i + o for normalized weights. Centring x_t and the norms on mu keeps the magnitudes,
# and so the float32 rounding of the logits, small.


def image_storage(num_images: int, shape: tuple[int, int, int], storage_dtype: str) -> torch.Tensor:
    """An empty image buffer `[num_images, C, H, W]` of the storage dtype (`"uint8"`, `"float16"` or `"float32"`)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"`storage_dtype` must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}.")
    if int(num_images) < 1:
        raise ValueError(f"`num_images` must be a positive integer, got {num_images}.")
    return torch.zeros(int(num_images), *shape, dtype=STORAGE_DTYPES[storage_dtype])


def storage_affine(dtype: torch.dtype) -> tuple[float, float]:
    """`(s, o)` with model-space value y = s r + o for a stored value r: `(1/127.5, -1)` for uint8, `(1, 0)` else."""
    return (1.0 / 127.5, -1.0) if dtype == torch.uint8 else (1.0, 0.0)


def buffer_key(images: torch.Tensor) -> tuple:
    """Identifies a buffer's storage and content version: derived statistics are recomputed when it changes."""
    try:
        version = images._version
    except RuntimeError:  # an inference-mode tensor has no version counter (and cannot be written in place)
        version = None
    return (images.data_ptr(), images.device, images.dtype, tuple(images.shape), version)


class StoredImageStats:
    """
    Statistics of a stored image buffer that are derived, not saved: the data mean mu `[D]` and the centred squared
    norms ||y_i - mu||^2 `[N]`, both accumulated in float64 and kept as float32 on the images' device.

    Recomputed lazily whenever the buffer changes (a new tensor after `from_pretrained` / `.to(device)`, or an
    in-place write), so they never go stale and never enter the safetensors file.
    """

    def __init__(self):
        self._key = None
        self.mean: torch.Tensor | None = None  # mu             [D]
        self.sq_norms: torch.Tensor | None = None  # ||y'_i||^2  [N]
        self.pinned_mean: torch.Tensor | None = None  # float64 mu of the full data set (data-parallel shards)
        self._mean64: torch.Tensor | None = None

    def pin_mean(self, images: torch.Tensor, chunk_size: int) -> None:
        """Keeps the mean of `images` (all of them) for later calls on a shard of them (`distributed.py`)."""
        self.get(images, chunk_size)
        self.pinned_mean, self._key = self._mean64.cpu(), None

    def get(self, images: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean [D], sq_norms [N])` of `images` `[N, C, H, W]`, computed at first use after a change."""
        key = buffer_key(images)
        chunk_size = min(chunk_size, 512)  # (float64 copies of a chunk: keep them small)
        if key != self._key:
            if self.pinned_mean is not None:
                mean64 = self.pinned_mean.to(images.device)
            else:
                total = torch.zeros(images[0].numel(), dtype=torch.float64, device=images.device)
                for _, chunk in image_chunks(images, chunk_size):
                    total += chunk.sum(dim=0, dtype=torch.float64)
                mean64 = total / len(images)  # [D]
            sq_norms = torch.empty(len(images), dtype=torch.float32, device=images.device)
            for start, chunk in image_chunks(images, chunk_size):
                sq_norms[start : start + len(chunk)] = (chunk.double() - mean64).square().sum(dim=1).float()
            self.mean, self.sq_norms, self._key, self._mean64 = mean64.float(), sq_norms, key, mean64
        return self.mean, self.sq_norms


def logit_coefficients(
    alpha_prod: torch.Tensor, beta_prod: torch.Tensor, temperature: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `(c1, c2)` = `(sqrt(a) / ((1 - a) tau), a / (2 (1 - a) tau))`, computed in float64 and returned as float32 `[B]`.
    1 - a is floored at 1e-20 so that 1 - a = 0 gives a one-hot (nearest image) posterior instead of NaN. (On the
    CPU: float64 is not available on every accelerator.)
    """
    alpha_prod, beta_prod = alpha_prod.detach().cpu().double(), beta_prod.detach().cpu().double()
    scale = 1.0 / (2.0 * beta_prod.clamp(min=1e-20) * temperature)  # 1 / (2 (1 - a) tau)
    c1 = 2.0 * alpha_prod.sqrt() * scale
    c2 = alpha_prod * scale
    return c1.float(), c2.float()


def logit_query(x_t, alpha_prod, beta_prod, mean, scale, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `(c1 s x' [B, D], -c2 [B])`: logits_i = query . r_i - c2 ||y'_i||^2 with x' = x_t - sqrt(a) mu (the streaming
    form above; terms without i cancel), for `x_t` float32 `[B, D]`, the data mean `mean` `[D]` and storage scale s.
    """
    c1, c2 = logit_coefficients(alpha_prod, beta_prod, temperature)
    sqrt_a = alpha_prod.detach().cpu().double().sqrt().float().to(x_t.device)  # [B]
    query = (x_t - sqrt_a[:, None] * mean) * (c1.to(x_t.device) * scale)[:, None]  # [B, D]
    return query, -c2.to(x_t.device)


# Two ways through the images for the posterior mean, both exact. With a broad posterior (high noise) every image
# has a weight and both GEMMs are dense: the fused path takes each cache-sized piece of images through the logits
# GEMM, the exponentials and the weighted-sum GEMM at once (the images are read once, not twice), against a fixed
# reference per row instead of the running max, so a piece costs four small ops. With a peaked posterior (low noise)
# most weights underflow: the general path keeps a running max per chunk and its weighted sum gathers only the
# images that still have a weight.
BROAD_ACTIVE_FRACTION = 0.5  # fused path when at least this share of the first piece is within 60 of its max
REFERENCE_MARGIN = 25.0  # fused reference m = max of the first piece + 25: the largest weight is >= e^-25
MAX_CHUNK_SUM = math.exp(50.0)  # a chunk whose weights sum to more (a logit above m + 50) is redone the general way
MIN_LOGIT = -87.0  # fused: l - m is raised to this before exp (e^-87 is a normal float32, no slow subnormals)
PIECE_BYTES = {"cpu": 1 << 21, "other": 1 << 26}  # a piece of images as float32: ~2 MB on a CPU (the L2 size;
# measured best), 64 MB on an accelerator (where small GEMMs only add kernel launches)


def _piece_size(device: torch.device, chunk_size: int, images: torch.Tensor) -> int:
    budget = PIECE_BYTES["cpu" if device.type == "cpu" else "other"]
    return max(1, min(chunk_size, len(images), budget // (4 * images[0].numel())))


class _PieceReader:
    """Stored values r of the images as float32, by pieces of `piece_size` (converted into one reused buffer)."""

    def __init__(self, images: torch.Tensor, piece_size: int):
        self.flat = images.reshape(len(images), -1)
        self.piece_size = piece_size
        self.buffer = None
        if self.flat.dtype != torch.float32:
            self.buffer = torch.empty(piece_size, self.flat.shape[1], device=images.device)

    def pieces(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        """`(offset from start, r [p, D])` for images start..stop; a piece is overwritten by the next."""
        for piece_start in range(start, stop, self.piece_size):
            piece = self.flat[piece_start : min(piece_start + self.piece_size, stop)]
            if self.buffer is not None:
                piece = self.buffer[: len(piece)].copy_(piece)
            yield piece_start - start, piece

    def rows(self, indices: torch.Tensor) -> torch.Tensor:
        """r of the images at `indices`, float32 `[k, D]` (a new tensor)."""
        return self.flat[indices].to(torch.float32)


def posterior_mean(
    x_t: torch.Tensor,
    alpha_prod: torch.Tensor,
    beta_prod: torch.Tensor,
    images: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    chunk_size: int,
    temperature: float = 1.0,
    labels: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    reduce_softmax: Callable[[OnlineSoftmax], OnlineSoftmax] | None = None,
) -> torch.Tensor:
    r"""
    The posterior mean under the empirical distribution of `images` (DESIGN.md section 2, "Optimal"):

        w_i = softmax_i( -||x_t - sqrt(a) y_i||^2 / (2 (1 - a) tau) ),   x0_hat = sum_i w_i y_i

    exact, streamed over chunks of `chunk_size` images (logits `[B, chunk_size]`), each read in cache-sized pieces:
    extra memory O(B * chunk_size + piece + B * D) per thread whatever N. Equal to the one-shot softmax over all N to
    float32 rounding, for any chunk size.

    On a CPU a small batch (up to `SPLIT_MAX_BATCH` rows) splits the images into one contiguous range per torch
    thread, each streamed by its own worker thread with single-threaded ops (its own pieces and logits buffer), and
    merges the ranges' online-softmax states, which is exact.

    The path is chosen per range from the logits of its first piece (see the comment above): fused when most of them
    are within 60 of their max (broad posterior), else general. In the fused path a weight below e^-87 of the
    reference becomes e^-87 (a relative change of the result below N e^-62), and a chunk holding a logit above the
    reference + 50 is detected and redone the general way, so neither over- nor underflow can change the result.

    Args:
        x_t (`torch.Tensor`): float32 `[B, D]`.
        alpha_prod, beta_prod (`torch.Tensor`): a and 1 - a, `[B]` (float64 preferred).
        images (`torch.Tensor`): the stored images `[N, C, H, W]` (uint8 `[0, 255]` or float model space).
        stats: `(mean [D], sq_norms [N])` from [`StoredImageStats`].
        chunk_size (`int`): images per chunk.
        temperature (`float`): tau > 0; 1 is the exact posterior.
        labels, class_labels (`torch.Tensor`, *optional*): stored labels `[N]` and one label per sample `[B]`:
            sample b's posterior is restricted to the images of its class (other weights are 0).
        reduce_softmax (`callable`, *optional*): applied to the online-softmax state before its result; a
            data-parallel shard all-reduces it there (`distributed.reduce_softmax_over_shards`).

    Returns:
        `torch.Tensor`: x0_hat, float32 `[B, D]`.
    """
    mean, sq_norms = stats
    scale, offset = storage_affine(images.dtype)
    query, neg_c2 = logit_query(x_t, alpha_prod, beta_prod, mean, scale, temperature)  # c1 s x' [B, D], -c2 [B]
    if class_labels is not None:
        class_labels = class_labels.to(x_t.device)

    def softmax_over(start: int, stop: int) -> OnlineSoftmax:
        other_class = None if class_labels is None else _OtherClass(labels[start:stop], class_labels)
        return _softmax_state(query, neg_c2, images[start:stop], sq_norms[start:stop], chunk_size, other_class)

    softmax, *others = _over_image_ranges(lambda bounds: softmax_over(*bounds), len(images), len(x_t), x_t.device)
    for state in others:
        softmax.merge(state)
    if reduce_softmax is not None:
        softmax = reduce_softmax(softmax)
    # x0_hat = sum_i w_i y_i = s (sum_i w_i r_i) + o.
    x0_hat = softmax.result()  # [B, D]
    if scale != 1.0 or offset != 0.0:
        x0_hat = x0_hat.mul_(scale).add_(offset)
    return x0_hat


# On a CPU the skinny GEMMs of a small batch ([B, D] x [D, piece]) gain little from a second BLAS thread: on the
# 2-core AMD EPYC of this project's machines, N = 10000 and B = 8 took 16 ms with one contiguous range of images per
# thread (each streamed with single-threaded ops, the online-softmax states merged exactly) against 23-30 ms with
# both BLAS threads on one stream; equal at B = 32, slower at B = 64 with N = 2000 (`benchmarks/bench_ab.py split`).
SPLIT_MAX_BATCH = 32  # split the images over the threads for batches up to this size
MIN_IMAGES_PER_THREAD = 1024
_POOL: ThreadPoolExecutor | None = None
_POOL_SIZE = 0
# torch's thread count is process-wide: one split at a time sets it to 1 and back (concurrent callers wait here).
_SPLIT_LOCK = threading.Lock()


def _forget_pool() -> None:  # a forked child has the executor object but not its threads
    global _POOL, _POOL_SIZE, _SPLIT_LOCK
    _POOL, _POOL_SIZE, _SPLIT_LOCK = None, 0, threading.Lock()


os.register_at_fork(after_in_child=_forget_pool)


def _image_ranges(num_images: int, batch_size: int, device: torch.device) -> list[tuple[int, int]]:
    """`[(start, stop)]`: one range of images per torch thread for a small batch on a CPU, else the whole range."""
    parts = 1
    if device.type == "cpu" and batch_size <= SPLIT_MAX_BATCH:
        parts = min(torch.get_num_threads(), num_images // MIN_IMAGES_PER_THREAD)
    if parts <= 1:
        return [(0, num_images)]
    bounds = [round(k * num_images / parts) for k in range(parts + 1)]
    return list(zip(bounds[:-1], bounds[1:]))


def _over_image_ranges(fn: Callable, num_images: int, batch_size: int, device: torch.device) -> list:
    """
    `[fn((start, stop)) ...]` over `_image_ranges`, in order: the single range in the calling thread, several ranges
    one per worker thread, with torch's intra-op threads set to 1 meanwhile (restored).
    """
    ranges = _image_ranges(num_images, batch_size, device)
    if len(ranges) == 1:
        return [fn(ranges[0])]
    global _POOL, _POOL_SIZE
    with _SPLIT_LOCK:
        if _POOL is None or _POOL_SIZE < len(ranges):
            _POOL = ThreadPoolExecutor(max_workers=len(ranges), thread_name_prefix="diffusers-analytic")
            _POOL_SIZE = len(ranges)
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            return list(_POOL.map(fn, ranges))
        finally:
            torch.set_num_threads(threads)


def _softmax_state(query, neg_c2, images, sq_norms, chunk_size, other_class) -> OnlineSoftmax:
    """The online-softmax state of the posterior over `images` (fused or general path, see `posterior_mean`)."""
    reader = _PieceReader(images, _piece_size(query.device, chunk_size, images))
    logits_buffer = torch.empty(len(query), min(chunk_size, len(images)), device=query.device)
    reference = None  # the fused path is for CPU caches; an accelerator reads a whole chunk per piece anyway
    if query.device.type == "cpu":
        reference = _broad_posterior_reference(query, neg_c2, reader, sq_norms, other_class)
    if reference is not None:
        return _fused_softmax(query, neg_c2, reader, sq_norms, chunk_size, reference, other_class, logits_buffer)
    softmax = OnlineSoftmax()
    for start in range(0, len(images), chunk_size):
        stop = min(start + chunk_size, len(images))
        _general_update(softmax, query, neg_c2, reader, sq_norms, start, stop, other_class, logits_buffer)
    return softmax


class _OtherClass:
    """`mask[start:stop]` -> `[B, n]`, True where image i's stored label differs from sample b's requested label."""

    def __init__(self, labels: torch.Tensor, class_labels: torch.Tensor):
        self.labels, self.class_labels = labels, class_labels

    def __getitem__(self, index: slice) -> torch.Tensor:
        return self.labels[index][None, :] != self.class_labels[:, None]


def _chunk_logits(query, neg_c2, reader, sq_norms, start, stop, other_class, logits_buffer) -> torch.Tensor:
    """logits_i = c1 s x'.r_i - c2 ||y'_i||^2 of images start..stop, `[B, n]`, -inf outside a row's class."""
    logits = logits_buffer[:, : stop - start]
    logits.copy_(torch.outer(neg_c2, sq_norms[start:stop]))
    for offset, piece in reader.pieces(start, stop):
        logits[:, offset : offset + len(piece)].addmm_(query, piece.T)
    if other_class is not None:
        logits.masked_fill_(other_class[start:stop], float("-inf"))
    return logits


def _general_update(softmax, query, neg_c2, reader, sq_norms, start, stop, other_class, logits_buffer) -> None:
    """One chunk of the online softmax: running max m, sum_i e^(l_i - m) and sum_i e^(l_i - m) r_i."""
    logits = _chunk_logits(query, neg_c2, reader, sq_norms, start, stop, other_class, logits_buffer)
    softmax.update(logits, lambda weights: _sparse_weighted_sum(weights, reader, start, stop))


def _sparse_weighted_sum(weights: torch.Tensor, reader: _PieceReader, start: int, stop: int) -> torch.Tensor:
    """
    `sum_i w_i r_i` over images start..stop (`weights` `[B, n]`), skipping the images whose weight is exactly 0 for
    every row (underflowed: at low noise the posterior is peaked and most of a chunk drops out). Exact.
    """
    total = torch.zeros(len(weights), reader.flat.shape[1], device=weights.device)  # [B, D]
    if weights.device.type == "cpu":
        active = torch.nonzero(weights.amax(dim=0) > 0).flatten()  # [k]
        if len(active) <= (stop - start) // 2:
            for part in active.split(reader.piece_size):  # gathered a piece at a time
                total.addmm_(weights[:, part], reader.rows(start + part))
            return total
    for offset, piece in reader.pieces(start, stop):
        total.addmm_(weights[:, offset : offset + len(piece)], piece)
    return total


def _broad_posterior_reference(query, neg_c2, reader, sq_norms, other_class) -> torch.Tensor | None:
    """
    The fused path's reference m `[B]` (max logit of the first piece + 25), or None for the general path: when
    fewer than half of the first piece's images are within 60 of their row's max in every row (a peaked posterior),
    or a row has no image of its class there.
    """
    stop = reader.piece_size
    logits = torch.empty(len(query), stop, device=query.device)
    logits = _chunk_logits(query, neg_c2, reader, sq_norms, 0, stop, other_class, logits)  # [B, p]
    top = logits.amax(dim=1)  # [B]
    if not bool(torch.isfinite(top).all()):
        return None
    active = (logits > top[:, None] - 60.0).any(dim=0)  # [p]
    if active.float().mean().item() < BROAD_ACTIVE_FRACTION:
        return None
    return top + REFERENCE_MARGIN


def _fused_softmax(
    query, neg_c2, reader, sq_norms, chunk_size, reference, other_class, logits_buffer
) -> OnlineSoftmax:
    """
    The online-softmax state over all images with the fixed reference m `[B]`: per piece of a chunk, the weights
    w_i = exp(l_i - m) (logits GEMM, exp) and their weighted sum (second GEMM) while the piece is in cache. A chunk
    whose weights sum to more than e^50 in some row (a logit above m + 50, or NaN) is redone with the general update,
    so no sum can overflow.
    """
    num_images = len(reader.flat)
    chunk_acc = torch.empty_like(query)  # sum_i w_i r_i over one chunk  [B, D]
    fused, redone = OnlineSoftmax(), OnlineSoftmax()
    fused.max, fused.sum, fused.acc = reference, torch.zeros_like(reference), torch.zeros_like(query)
    for start in range(0, num_images, chunk_size):
        stop = min(start + chunk_size, num_images)
        weights = logits_buffer[:, : stop - start]  # [B, n]
        # w_i = exp(c1 s x'.r_i - c2 ||y'_i||^2 - m): the last two terms here, the GEMM adds the first per piece.
        weights.copy_(torch.outer(neg_c2, sq_norms[start:stop])).sub_(reference[:, None])
        mask = None if other_class is None else other_class[start:stop]
        chunk_acc.zero_()
        for offset, piece in reader.pieces(start, stop):
            piece_weights = weights[:, offset : offset + len(piece)]  # [B, p]
            piece_weights.addmm_(query, piece.T).clamp_(min=MIN_LOGIT).exp_()
            if mask is not None:
                piece_weights.masked_fill_(mask[:, offset : offset + len(piece)], 0.0)
            chunk_acc.addmm_(piece_weights, piece)
        chunk_sum = weights.sum(dim=1)  # [B]
        if bool((chunk_sum <= MAX_CHUNK_SUM).all()):  # (False for NaN; and sum_i w_i r_i <= e^50 max|r| is finite)
            fused.sum += chunk_sum
            fused.acc += chunk_acc
        else:
            _general_update(redone, query, neg_c2, reader, sq_norms, start, stop, other_class, logits_buffer)
    fused.merge(redone)
    return fused


def posterior_mean_over_neighbors(
    x_t: torch.Tensor,
    alpha_prod: torch.Tensor,
    beta_prod: torch.Tensor,
    images: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    neighbors: torch.Tensor,
    chunk_size: int,
    temperature: float = 1.0,
) -> torch.Tensor:
    """
    [`posterior_mean`] with each sample's softmax restricted to its own candidate images: `neighbors` int64 `[B, k]`
    (indices into `images`; -1 marks an empty slot). The same logits, batched over samples and streamed over the k
    candidates in slices of about four pieces of images in all (~8 MB on a CPU, whatever k). Returns
    float32 `[B, D]`.
    """
    mean, sq_norms = stats
    batch_size, k = neighbors.shape
    scale, offset = storage_affine(images.dtype)
    query, neg_c2 = logit_query(x_t, alpha_prod, beta_prod, mean, scale, temperature)  # c1 s x' [B, D], -c2 [B]
    flat = images.reshape(len(images), -1)
    neighbors = neighbors.to(x_t.device)
    step = max(1, 4 * _piece_size(x_t.device, chunk_size, images) // batch_size)  # candidates per row and slice
    softmax = OnlineSoftmax()
    for start in range(0, k, step):
        ids = neighbors[:, start : start + step]  # [B, n]
        valid = ids >= 0
        safe_ids = ids.clamp(min=0)
        chunk = flat[safe_ids].to(torch.float32)  # r  [B, n, D]
        logits = torch.bmm(chunk, query[:, :, None]).squeeze(-1) + neg_c2[:, None] * sq_norms[safe_ids]  # [B, n]
        logits.masked_fill_(~valid, float("-inf"))
        softmax.update(logits, lambda weights, chunk=chunk: torch.bmm(weights[:, None, :], chunk).squeeze(1))
    x0_hat = softmax.result()  # [B, D]
    if scale != 1.0 or offset != 0.0:
        x0_hat = x0_hat.mul_(scale).add_(offset)
    return x0_hat


def nearest_indices(
    x_t: torch.Tensor,
    alpha_prod: torch.Tensor,
    images: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    chunk_size: int,
    labels: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
    return_scores: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """
    `argmin_i ||x_t - sqrt(a) y_i||^2` for each row of `x_t` float32 `[B, D]`, exact, streamed over chunks: the score
    a ||y'_i||^2 - 2 sqrt(a) s x'.r_i differs from the squared distance by a per-row constant (notation above).
    With `labels` / `class_labels`, only images of each sample's class compete. Returns int64 `[B]`, and with
    `return_scores` also the winning scores `[B]` (a data-parallel shard compares them across processes).
    """
    mean, sq_norms = stats
    scale, _ = storage_affine(images.dtype)
    a = alpha_prod.detach().cpu().double()
    sqrt_a = a.sqrt().float().to(x_t.device)
    two_sqrt_a_s = (2.0 * a.sqrt() * scale).float().to(x_t.device)
    query = (x_t - sqrt_a[:, None] * mean) * two_sqrt_a_s[:, None]  # 2 sqrt(a) s x'  [B, D]
    neg_a = -a.float().to(x_t.device)
    if class_labels is not None:
        class_labels = class_labels.to(x_t.device)

    def nearest_over(bounds: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        start, stop = bounds
        other_class = None if class_labels is None else _OtherClass(labels[start:stop], class_labels)
        index, score = _nearest_state(query, neg_a, images[start:stop], sq_norms[start:stop], chunk_size, other_class)
        return index + start, score

    (best_index, best_score), *others = _over_image_ranges(nearest_over, len(images), len(x_t), x_t.device)
    for index, score in others:  # ranges in order: on a tie the lower index stays
        better = score < best_score
        best_score = torch.where(better, score, best_score)
        best_index = torch.where(better, index, best_index)
    if return_scores:
        return best_index, best_score
    return best_index


def _nearest_state(query, neg_a, images, sq_norms, chunk_size, other_class) -> tuple[torch.Tensor, torch.Tensor]:
    """`(index [B], score [B])` of the best-scoring image of `images` per row, streamed over chunks."""
    reader = _PieceReader(images, _piece_size(query.device, chunk_size, images))
    logits_buffer = torch.empty(len(query), min(chunk_size, len(images)), device=query.device)
    best_score = torch.full((len(query),), float("inf"), device=query.device)
    best_index = torch.zeros(len(query), dtype=torch.int64, device=query.device)
    for start in range(0, len(images), chunk_size):
        stop = min(start + chunk_size, len(images))
        # -score_i = 2 sqrt(a) s x'.r_i - a ||y'_i||^2, the logits' form with query 2 sqrt(a) s x' (-inf off-class)
        neg_scores = _chunk_logits(query, neg_a, reader, sq_norms, start, stop, other_class, logits_buffer)
        chunk_best, chunk_index = neg_scores.max(dim=1)
        better = -chunk_best < best_score
        best_score = torch.where(better, -chunk_best, best_score)
        best_index = torch.where(better, chunk_index + start, best_index)
    return best_index, best_score


# ---------------------------------------------------------------------------------------------- PCA locality (issue 4)
def wiener_gains(eigvals: torch.Tensor, alpha_prod: float) -> torch.Tensor:
    """
    The Wiener filter's gain per eigendirection, `a lam / (a lam + 1 - a)`, float64 `[D]`; 0 where `a lam + 1 - a`
    is 0 (a direction without variance at `a = 1`).
    """
    lam = eigvals.to(torch.float64)
    denominator = alpha_prod * lam + (1.0 - alpha_prod)
    return torch.where(denominator > 0, alpha_prod * lam / denominator.clamp(min=1e-300), torch.zeros_like(lam))


def symmetric_product(left: torch.Tensor, right: torch.Tensor, block_rows: int = 512) -> torch.Tensor:
    """
    `left @ right.T` `[D, D]` for a product known to be symmetric (here U diag(g) U^T): blocks of about `block_rows`
    rows, each block above the diagonal computed once and mirrored, about (k + 1) / 2k of the full GEMM's flops for k
    blocks per side (measured 0.70 -> 0.47 s in float64 at D = 3072, the same mask).
    """
    dim = len(left)
    parts = max(1, round(dim / block_rows))
    bounds = [round(k * dim / parts) for k in range(parts + 1)]
    out = torch.empty(dim, dim, dtype=left.dtype, device=left.device)
    for i, (row_start, row_stop) in enumerate(zip(bounds[:-1], bounds[1:])):
        for col_start, col_stop in zip(bounds[i:-1], bounds[i + 1 :]):
            block = left[row_start:row_stop] @ right[col_start:col_stop].T
            out[row_start:row_stop, col_start:col_stop] = block
            if col_start != row_start:
                out[col_start:col_stop, row_start:row_stop] = block.T
    return out


def pca_locality_mask(
    eigvecs: torch.Tensor,
    eigvals: torch.Tensor,
    alpha_prod: float,
    mask_threshold: float,
    diagonal_guard: float = 1e-6,
) -> torch.Tensor:
    r"""
    The locality mask of PCA-locality (Lukoianov et al. 2025; DESIGN.md section 2) at one noise level `a`:

        W = U diag( a lam / (a lam + 1 - a) ) U^T,     R[q, p] = W[q, p] / W[q, q]  (|W_qq| < guard -> 1)
        M[q, p] = 1  if |R[q, p]| >= mask_threshold * max |R|  else 0,   or  M = R  when mask_threshold = 0.

    Column p of M is the set of input pixels q that output pixel p looks at. W and R are computed in float64 (one
    symmetric D x D product), so the binary mask equals a float64 computation from the same `eigvecs` / `eigvals`
    (a float32 W can misplace entries that lie within its rounding of the threshold, which changes the result of a
    whole pixel).

    Args:
        eigvecs (`torch.Tensor`): U, `[D, D]` (orthonormal columns).
        eigvals (`torch.Tensor`): lam, `[D]`, >= 0.
        alpha_prod (`float`): a.
        mask_threshold (`float`): in [0, 1]; 0 returns the soft (signed) R.
        diagonal_guard (`float`): rows with |W_qq| below it are divided by 1 instead.

    Returns:
        `torch.Tensor`: a bool `[D, D]` mask, or the float32 soft mask R when `mask_threshold` is 0.
    """
    eigvecs = eigvecs.to(torch.float64)
    gains = wiener_gains(eigvals, alpha_prod).to(eigvecs.device)  # g  [D]
    ratio = symmetric_product(eigvecs * gains, eigvecs)  # W = (U diag(g)) U^T  [D, D]
    diagonal = ratio.diagonal().clone()  # W_qq  [D]
    ratio /= torch.where(diagonal.abs() < diagonal_guard, torch.ones_like(diagonal), diagonal)[:, None]  # R
    if mask_threshold == 0:
        return ratio.to(torch.float32)
    magnitude = ratio.abs_()  # |R|
    return magnitude >= mask_threshold * magnitude.max()


def locality_tiles(
    mask: torch.Tensor,
    sample_shape: tuple[int, int, int],
    batch_size: int = 8,
    max_tile_pixels: int = 512,
    gather_cost: float = 64.0,
    tile_overhead: float = 2e4,
    sparse_advantage: float = 0.45,
    variants: tuple[str, ...] = ("dense", "direct", "complement"),
) -> list[tuple[torch.Tensor, torch.Tensor | None, bool]]:
    """
    Groups output pixels into tiles that share their input support, so that the distances of a whole tile are one
    dense GEMM over the union of its columns' supports: work proportional to the mask's non-zeros, at GEMM rate.

    A tile is every channel of an `s x s` block of pixel positions. It reads either the union of its columns'
    supports in M (`complement = False`), or, for nearly full masks, the union of the supports of `1 - M`
    (`complement = True`: the distance is the full distance minus the complement's, and the full distance is one
    GEMM for all pixels). The side `s` and the variant minimise the estimated multiply-adds per stored image,
    `sum_T |inputs_T| (|T| (batch_size + 1) + gather_cost) + tile_overhead * num_tiles` (+ `D (batch_size + 1)` for
    the full distance). The dense formulation (blocks of consecutive output pixels reading all D inputs, no gather;
    `PCALocalityDenoiser` runs it as one GEMM for all pixels) is one of the candidates, and a sparse tiling replaces
    it only when its estimate is below `sparse_advantage` times the dense one (gathers and small GEMMs run below the
    dense GEMM rate), so it is never slower than dense.
    0.45: on 32x32x3 patches (2 CPU cores) complement tiles of 48 pixels ran at ~0.55 of the dense tiles'
    multiply-add rate (t = 700, 94% non-zero: 1.9 s against 3.2 s dense per step, N = 2000, B = 8).

    Args:
        mask (`torch.Tensor`): `[D, D]`, bool (binary mask) or float (soft mask: always dense).
        sample_shape (`(C, H, W)`): the image shape; pixel index = c H W + h W + w.
        variants (`tuple[str]`): the tilings to choose from, `"dense"`, `"direct"`, `"complement"` (all by default;
            restricting them is for tests and benchmarks, the result does not depend on it).

    Returns:
        `list[(p_idx, q_idx, complement)]`: output pixels `[P]` of each tile, the inputs `[K]` it reads (`None`: all
        D, in order) and whether it reads the complement `1 - M`.
    """
    channels, height, width = sample_shape
    dim = channels * height * width
    device = mask.device
    dense_block = max(1, min(dim, max_tile_pixels))
    best = [
        (torch.arange(s, min(s + dense_block, dim), device=device), None, False) for s in range(0, dim, dense_block)
    ]
    if mask.dtype != torch.bool:
        return best
    best_cost = float("inf")
    if "dense" in variants:
        best_cost = sparse_advantage * (dim * dim * (batch_size + 1) + tile_overhead * len(best))
        # every column reads at least its own support: skip the search when even that cannot beat dense
        nonzero = int(mask.sum())
        if min(nonzero, dim * dim - nonzero) * (batch_size + 1) >= best_cost:
            return best
    pixel_index = torch.arange(dim, device=device).reshape(channels, height, width)
    side = 1
    while side < max(height, width) and channels * (2 * side) ** 2 <= max_tile_pixels:
        side *= 2
        tiles_h, tiles_w = -(-height // side), -(-width // side)
        rows_in = torch.clamp(height - torch.arange(tiles_h, device=device) * side, max=side)
        cols_in = torch.clamp(width - torch.arange(tiles_w, device=device) * side, max=side)
        tile_size = channels * rows_in[:, None] * cols_in[None, :]  # [tiles_h, tiles_w]
        pad = (0, tiles_w * side - width, 0, tiles_h * side - height)
        for complement in [v == "complement" for v in variants if v != "dense"]:
            # [D, C, H, W] -> padded to whole tiles -> any over each tile's columns -> [D, tiles_h, tiles_w]
            columns = (~mask if complement else mask).reshape(dim, channels, height, width)
            columns = torch.nn.functional.pad(columns, pad) if any(pad) else columns
            support = columns.reshape(dim, channels, tiles_h, side, tiles_w, side).any(dim=5).any(dim=3).any(dim=1)
            support_size = support.sum(0)  # [tiles_h, tiles_w]
            cost = float((support_size * (tile_size * (batch_size + 1) + gather_cost)).sum())
            cost += tile_overhead * tiles_h * tiles_w + (dim * (batch_size + 1) if complement else 0)
            if cost >= best_cost:
                continue
            best_cost, best = cost, []
            for i in range(tiles_h):
                for j in range(tiles_w):
                    block = pixel_index[:, i * side : (i + 1) * side, j * side : (j + 1) * side].reshape(-1)
                    inputs = torch.nonzero(support[:, i, j], as_tuple=True)[0]
                    if len(inputs) == 0:  # no input: its (zero) mask entries are read from one pixel
                        inputs = block[:1]
                    best.append((block, inputs, complement))
    return best


# ---------------------------------------------------------------------------------------------- patch machines (LS / ELS)
# Patches of odd size k = 2 r + 1 (all channels) around each pixel, for the local score (LS) and equivariant local
# score (ELS) machines of Kamb & Ganguli (arXiv 2412.20292). Padding rules: "zeros" pads with zeros, "circular" wraps
# around (any radius, also r >= H). Positions are flat indices p = y * W + x of the un-padded image.
PATCH_PADDINGS = ("zeros", "circular")


def pad_images(images: torch.Tensor, radius: int, padding: str) -> torch.Tensor:
    """`[..., H, W]` -> `[..., H + 2 r, W + 2 r]`, zero or circular (wrapping as often as needed) padding."""
    if padding not in PATCH_PADDINGS:
        raise ValueError(f"`padding` must be one of {PATCH_PADDINGS}, got {padding!r}.")
    if radius == 0:
        return images
    if padding == "zeros":
        return torch.nn.functional.pad(images, (radius, radius, radius, radius))
    height, width = images.shape[-2:]
    rows = torch.arange(-radius, height + radius, device=images.device) % height
    cols = torch.arange(-radius, width + radius, device=images.device) % width
    return images[..., rows[:, None], cols[None, :]]


def box_sum(maps: torch.Tensor, patch_size: int, padding: str) -> torch.Tensor:
    """
    Sum of `maps` `[X, H, W]` over the k x k window around every pixel of the padded maps (zero or circular padding):
    `[X, H, W]`. Separable: two 1-d sums of k terms each (sum pooling), O(k) per pixel.
    """
    radius = patch_size // 2
    padded = pad_images(maps, radius, padding).unsqueeze(1)  # [X, 1, H + 2r, W + 2r]
    pool = torch.nn.functional.avg_pool2d
    summed = pool(padded, (patch_size, 1), stride=1, divisor_override=1)
    summed = pool(summed, (1, patch_size), stride=1, divisor_override=1)
    return summed.squeeze(1)


def image_patches(padded: torch.Tensor, patch_size: int, positions: torch.Tensor | None = None) -> torch.Tensor:
    """
    The k x k patches of already padded images `[n, C, H + 2r, W + 2r]` around each un-padded pixel, flattened in
    (channel, row, column) order: `[n, P, C k k]`, P = H W, or the `positions` (flat indices) only.
    """
    count, channels = padded.shape[:2]
    windows = padded.unfold(2, patch_size, 1).unfold(3, patch_size, 1)  # a view  [n, C, H, W, k, k]
    patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(
        count, -1, channels * patch_size * patch_size
    )  # [n, H W, C k k]
    return patches if positions is None else patches[:, positions]


def patch_position_groups(
    height: int, width: int, patch_size: int, padding: str, boundary_aware: bool
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    Which training patches each query pixel's patch is compared with in the ELS machine: a list of
    `(query positions, training positions)` pairs of flat pixel indices. Training patches come from every stored
    image at every training position of the pair.

    - `"circular"`: one group; every pixel against the patches at all H W positions (wrapped).
    - `"zeros"`: one group; every pixel (its patch padded with zeros) against the valid patches, those that lie
      inside the image: (H - k + 1) (W - k + 1) positions.
    - `"zeros"` with `boundary_aware`: pixels are grouped by how far their window overflows each border, the pair
      (top, bottom) overflow per row, max(0, r - y) and max(0, y + r - (H - 1)), and likewise per column. A pixel is
      compared with the patches of the zero-padded training images at the positions of its own group: interior
      pixels (no overflow) with all valid patches, a pixel near an edge with the patches at the same distance from
      that edge anywhere along it, a corner pixel with the patches at that corner only.
    """
    radius = patch_size // 2
    if padding == "circular":
        everywhere = torch.arange(height * width)
        return [(everywhere, everywhere)]

    def classes(size):  # positions grouped by (low, high) overflow; the interior is one class
        groups: dict[tuple[int, int], list[int]] = {}
        for position in range(size):
            key = (max(0, radius - position), max(0, position + radius - (size - 1)))
            groups.setdefault(key, []).append(position)
        return groups

    row_classes, col_classes = classes(height), classes(width)
    if not boundary_aware:
        valid_rows, valid_cols = row_classes.get((0, 0)), col_classes.get((0, 0))
        if valid_rows is None or valid_cols is None:
            raise ValueError(
                f"Patch size {patch_size} has no valid (in-image) patch in a {height}x{width} image; use a size <= "
                f"{min(height, width)}, circular padding or boundary_aware=True."
            )
        valid = (torch.tensor(valid_rows)[:, None] * width + torch.tensor(valid_cols)[None, :]).reshape(-1)
        return [(torch.arange(height * width), valid)]
    groups = []
    for rows in row_classes.values():
        for cols in col_classes.values():
            positions = (torch.tensor(rows)[:, None] * width + torch.tensor(cols)[None, :]).reshape(-1)
            groups.append((positions, positions))
    return groups


def patch_logit_coefficients(alpha_prod: torch.Tensor, beta_prod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """
    -||x - sqrt(a) q||^2 / (2 (1 - a)) less the query-only term is c1 x.q - c2 ||q||^2 with c1 = sqrt(a) / (1 - a)
    and c2 = a / (2 (1 - a)); float64 -> float32 `[B]`. 1 - a is floored at 1e-20 (a one-hot posterior, not NaN).
    """
    one_minus_a = beta_prod.double().clamp(min=1e-20)
    c1 = alpha_prod.double().sqrt() / one_minus_a
    c2 = alpha_prod.double() / (2.0 * one_minus_a)
    return c1.float(), c2.float()


class StoredImageMean:
    """
    The mean of a stored image buffer `[N, C, H, W]` (float64 sum, kept float32), per pixel `[C, H, W]` or per
    channel `[C]`; recomputed lazily when the buffer changes (load, `.to()`, in-place write), never saved.
    """

    def __init__(self, per_channel: bool):
        self.per_channel = per_channel
        self._key = None
        self._mean: torch.Tensor | None = None

    def get(self, images: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        key = (images.data_ptr(), images.device, images.dtype, tuple(images.shape), images._version)
        if key != self._key:
            total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
            for start in range(0, len(images), chunk_size):
                total += to_model_space(images[start : start + chunk_size], torch.float64).sum(dim=0)
            mean = total / len(images)  # [C, H, W]
            if self.per_channel:
                mean = mean.mean(dim=(1, 2))  # [C]
            self._mean, self._key = mean.float(), key
        return self._mean
