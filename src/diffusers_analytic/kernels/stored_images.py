"""Stored training images: their storage dtypes, the affine decode to model space, streaming in chunks and pieces,
and the statistics derived from them (never saved: recomputed when the buffer changes).

A stored value r (uint8 0..255, or a float already in model space) maps to the model-space value y = s r + o with
`(s, o) = storage_affine(dtype)`: `(1/127.5, -1)` for uint8, `(1, 0)` for floats. uint8 storage is exact for 8-bit
data and 4x smaller than float32.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator

import torch

from ..data import iter_image_batches, to_model_space

# A class label that restricts a row to no class (real labels are never this value): classifier-free guidance runs the
# unconditional and the class-conditional rows of a batch in one pass over the images.
ANY_CLASS = torch.iinfo(torch.int64).min
STORAGE_DTYPES = {"uint8": torch.uint8, "float16": torch.float16, "float32": torch.float32}
# A piece of images as float32 is about this many bytes: a CPU core's L2 cache (pieces are read twice while in
# cache); an accelerator takes large pieces, where small GEMMs would only add kernel launches.
PIECE_BYTES = {"cpu": 1 << 21, "other": 1 << 26}
# ... but at least this many images: a piece of few large images (42 at 64x64x3) makes every GEMM re-read the whole
# query batch for little work (a B = 64 optimal call at D = 12288 measured 5-7x slower with 42 than with 128 or more).
MIN_PIECE_IMAGES = 128
# A stored set of at most this many bytes as float32 keeps a decoded float32 copy for the calls (`DecodedImages`).
DECODED_COPY_BYTES = 1 << 21


def other_class_mask(labels: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
    """
    True where a stored image's label differs from its row's requested class, never for a row labelled `ANY_CLASS`;
    `labels` and `class_labels` broadcast against each other (e.g. `[1, n]` stored labels against `[B, 1]` requests).
    """
    return (labels != class_labels) & (class_labels != ANY_CLASS)


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


class CacheLock:
    """
    The lock of a lazily built cache, so that two threads making the first call at once build it once and never see
    it half built. Re-entrant; a copy or a pickle of its owner gets a fresh lock (threading locks cannot be copied).
    """

    def __init__(self):
        self._lock = threading.RLock()

    def __enter__(self):
        return self._lock.__enter__()

    def __exit__(self, *exc_info):
        return self._lock.__exit__(*exc_info)

    def __reduce__(self):
        return (CacheLock, ())


class StoredImageStats:
    """
    Statistics of a stored image buffer that are derived, not saved: the data mean mu `[D]` and the centred squared
    norms ||y_i - mu||^2 `[N]`, both accumulated in float64 and kept as float32 on the images' device.

    Recomputed lazily whenever the buffer changes (a new tensor after `from_pretrained` / `.to(device)`, or an
    in-place write), so they never go stale and never enter the safetensors file. Safe when threads race.
    """

    def __init__(self):
        self._lock = CacheLock()
        self._key = None
        self.mean: torch.Tensor | None = None  # mu             [D]
        self.sq_norms: torch.Tensor | None = None  # ||y'_i||^2  [N]
        self.pinned_mean: torch.Tensor | None = None  # float64 mu of the full data set (data-parallel shards)
        self._mean64: torch.Tensor | None = None

    def pin_mean(self, images: torch.Tensor, chunk_size: int) -> None:
        """Keeps the mean of `images` (all of them) for later calls on a shard of them (a data-parallel shard)."""
        with self._lock:
            self.get(images, chunk_size)
            self.pinned_mean, self._key = self._mean64.cpu(), None

    def get(self, images: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean [D], sq_norms [N])` of `images` `[N, C, H, W]`, computed at first use after a change."""
        key = buffer_key(images)
        chunk_size = min(chunk_size, 512)  # (float64 copies of a chunk: keep them small)
        with self._lock:
            if key == self._key:
                return self.mean, self.sq_norms
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


class DecodedImages:
    """
    A float32 model-space copy of a small stored-image buffer (at most `DECODED_COPY_BYTES` as float32, e.g. 8x8
    digits), so that a call reads the images without converting each one again: on small data a call's cost is its
    fixed work. Larger or float32 buffers are returned as they are. Refreshed when the buffer changes (load, `.to()`,
    an in-place write, a data-parallel shard), never saved. Safe when threads race.
    """

    def __init__(self):
        self._lock = CacheLock()
        self._key = None
        self._copy: torch.Tensor | None = None

    def get(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.float32 or 4 * images.numel() > DECODED_COPY_BYTES:
            return images
        key = buffer_key(images)
        with self._lock:
            if key != self._key:
                self._copy, self._key = to_model_space(images, torch.float32), key
            return self._copy


def piece_size(device: torch.device, chunk_size: int, images: torch.Tensor) -> int:
    """Images per piece: about `PIECE_BYTES` of float32 values but at least `MIN_PIECE_IMAGES`, at most `chunk_size`
    and N."""
    budget = PIECE_BYTES["cpu" if device.type == "cpu" else "other"]
    return max(1, min(chunk_size, len(images), max(MIN_PIECE_IMAGES, budget // (4 * images[0].numel()))))


class StoredImageMean:
    """
    The mean of a stored image buffer `[N, C, H, W]` (float64 sum, kept float32), per pixel `[C, H, W]` or per
    channel `[C]`; recomputed lazily when the buffer changes (load, `.to()`, in-place write), never saved. Safe when
    threads race.
    """

    def __init__(self, per_channel: bool):
        self._lock = CacheLock()
        self.per_channel = per_channel
        self._key = None
        self._mean: torch.Tensor | None = None

    def get(self, images: torch.Tensor, chunk_size: int = 1024) -> torch.Tensor:
        key = buffer_key(images)
        with self._lock:
            if key == self._key:
                return self._mean
            total = torch.zeros(images.shape[1:], dtype=torch.float64, device=images.device)
            for start in range(0, len(images), chunk_size):
                total += to_model_space(images[start : start + chunk_size], torch.float64).sum(dim=0)
            mean = total / len(images)  # [C, H, W]
            if self.per_channel:
                mean = mean.mean(dim=(1, 2))  # [C]
            self._mean, self._key = mean.float(), key
            return self._mean
