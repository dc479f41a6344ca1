"""Pure math shared by several denoisers: the online (streaming) softmax and chunked access to stored images."""

from __future__ import annotations

from collections.abc import Callable, Iterator

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
