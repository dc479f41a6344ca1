"""Approximate top-k neighbour search over stored images with FAISS (optional dependency, imported only here).

Used by the optimal and smoothed CFDM denoisers when `num_neighbors=k` is set. The index is never saved: it is built
from the stored images at the first call that needs it (and again whenever the image buffer changes, e.g. after
`from_pretrained` or `.to(device)`), so a saved folder stays a config + one safetensors file.

Index kinds:
- `"flat"`: `IndexFlatL2`, exact k-nearest search (the k found are the true k nearest).
- `"ivf"`: `IndexIVFFlat` with `nlist = 4 sqrt(N)` lists and `nprobe` probed lists per query: approximate.
- `"auto"`: flat up to `ivf_threshold` images, IVF above.
A GPU index is used when the installed faiss has GPUs (`faiss.get_num_gpus() > 0`), a CPU index otherwise.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from diffusers.utils import logging

from .stored_images import CacheLock, buffer_key, image_chunks

logger = logging.get_logger(__name__)

INDEX_TYPES = ("auto", "flat", "ivf")


def import_faiss():
    """faiss, or an ImportError that says how to install it."""
    try:
        import faiss
    except ImportError as error:  # pragma: no cover - faiss-cpu is a test dependency
        raise ImportError(
            "`num_neighbors` (top-k mode) needs faiss: `pip install faiss-cpu` (or a GPU build of faiss)."
        ) from error
    return faiss


def build_index(
    images: torch.Tensor,
    chunk_size: int,
    index_type: str = "auto",
    ivf_threshold: int = 100_000,
    ivf_nprobe: int = 32,
    indices: torch.Tensor | None = None,
):
    """
    A FAISS L2 index over the model-space images y_i (all of them, or the subset `indices`), added chunk by chunk.
    FAISS holds its own float32 copy: N * D * 4 bytes.
    """
    faiss = import_faiss()
    if index_type not in INDEX_TYPES:
        raise ValueError(f"`faiss_index` must be one of {INDEX_TYPES}, got {index_type!r}.")
    count = len(images) if indices is None else len(indices)
    dim = images[0].numel()
    use_ivf = index_type == "ivf" or (index_type == "auto" and count > ivf_threshold)
    if use_ivf:
        nlist = max(1, min(count // 39, int(4 * math.sqrt(count))))
        index = faiss.IndexIVFFlat(faiss.IndexFlatL2(dim), dim, nlist)
        index.nprobe = min(ivf_nprobe, nlist)
        # Train the coarse quantizer on an evenly spaced sample of at most 256 points per list.
        step = max(1, count // (256 * nlist))
        sample_positions = torch.arange(0, count, step)
        sample_indices = sample_positions if indices is None else indices[sample_positions]
        training = torch.cat([chunk.cpu() for _, chunk in image_chunks(images, chunk_size, sample_indices)])
        index.train(np.ascontiguousarray(training.numpy()))
    else:
        index = faiss.IndexFlatL2(dim)
    if faiss.get_num_gpus() > 0:
        index = faiss.index_cpu_to_all_gpus(index)
    for _, chunk in image_chunks(images, chunk_size, indices):
        index.add(np.ascontiguousarray(chunk.cpu().numpy()))
    logger.info(f"Built a FAISS {'IVF' if use_ivf else 'flat'} index over {count} images.")
    return index


class NeighborIndex:
    """
    Lazily built FAISS indices over a stored image buffer: one over all images, and one per class when samples are
    restricted to their class. Rebuilt when the buffer changes; built once when threads race.
    """

    def __init__(self):
        self._lock = CacheLock()
        self._key = None
        self._indices: dict = {}

    def search(
        self,
        queries: torch.Tensor,
        k: int,
        images: torch.Tensor,
        chunk_size: int,
        index_type: str,
        ivf_threshold: int,
        ivf_nprobe: int,
        labels: torch.Tensor | None = None,
        class_labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """
        The (up to) k nearest stored images of each query row (float32 `[B, D]`, x_t / sqrt(a)) as int64 `[B, k]`
        indices into the full buffer, -1 where fewer than k were found (IVF, or a class with fewer than k images);
        with `class_labels`, among the images of each sample's class.
        """
        groups = [None] if class_labels is None else sorted(set(class_labels.tolist()))
        found = torch.full((len(queries), k), -1, dtype=torch.int64)
        for group in groups:
            index, members = self._index(group, images, labels, chunk_size, index_type, ivf_threshold, ivf_nprobe)
            rows = (
                torch.arange(len(queries)) if group is None else torch.nonzero(class_labels.cpu() == group).flatten()
            )
            group_k = min(k, index.ntotal)
            _, neighbours = index.search(np.ascontiguousarray(queries[rows.to(queries.device)].cpu().numpy()), group_k)
            neighbours = torch.from_numpy(neighbours).long()  # [rows, group_k], -1 = not found
            if members is not None:
                neighbours = torch.where(neighbours >= 0, members[neighbours.clamp(min=0)], neighbours)
            found[rows, :group_k] = neighbours
        return found.to(images.device)

    def _index(self, group, images, labels, chunk_size, index_type, ivf_threshold, ivf_nprobe):
        """`(index, member indices or None)` of one class (`group`; None = all images), built at first use."""
        key = buffer_key(images)
        with self._lock:
            if key != self._key:
                self._indices, self._key = {}, key
            if group not in self._indices:
                members = None if group is None else torch.nonzero(labels.cpu() == group).flatten()
                index = build_index(images, chunk_size, index_type, ivf_threshold, ivf_nprobe, members)
                self._indices[group] = (index, members)
            return self._indices[group]


def check_neighbor_config(num_neighbors: int | None, num_images: int, faiss_index: str) -> None:
    """The top-k settings of a data-holding denoiser: `num_neighbors` in [1, N] (or None) and a known index kind."""
    if num_neighbors is not None and not 1 <= num_neighbors <= num_images:
        raise ValueError(f"`num_neighbors` must be in [1, {num_images}] (the number of images), got {num_neighbors}.")
    if faiss_index not in INDEX_TYPES:
        raise ValueError(f"`faiss_index` must be one of {INDEX_TYPES}, got {faiss_index!r}.")
