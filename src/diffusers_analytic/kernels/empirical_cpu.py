r"""The CPU fast path of the empirical posterior mean and the nearest-image search (`kernels.empirical`).

Same math as the plain loop there, arranged for a CPU's caches and cores; every result is exact (the online-softmax
states and argmins are merged exactly), and nothing process-wide is touched: no thread counts, no worker threads.

0. One piece. When all stored images fit in one cache-sized piece (small data sets such as 8x8 digits), a call is
   one GEMM over all of them and one softmax: no blocks, no pieces, no choice of path, where a call's fixed costs
   (the number of small tensor operations) matter more than its arithmetic.
1. Blocks. The stored images are viewed as G contiguous blocks, `[G, n, D]`, and each step runs one batched GEMM
   over all blocks (`torch.baddbmm`), which the BLAS spreads one block per core. A small batch's skinny GEMM
   `[B, D] x [D, n]` gains little from a second core inside one product; G independent products use them all.
   G = the torch thread count for batches up to `SMALL_BATCH` rows with at least `MIN_IMAGES_PER_BLOCK` images per
   block, else 1. Each block keeps its own softmax rows (`[G, B]`), merged at the end (`OnlineSoftmax.merge_leading`).
2. Pieces. Images are read in cache-sized pieces (`stored_images.PIECE_BYTES` of float32 per block), converted from
   uint8 into one reused buffer.
3. Two ways through the pieces, chosen per call from the logits of the first piece:
   - broad posterior (high noise; most images have a weight): the *fused* path takes each piece through the logits
     GEMM, the exponentials and the weighted-sum GEMM while it is in cache, against a fixed reference m per row
     (the first piece's max + `REFERENCE_MARGIN`) instead of a running max. A chunk whose weights sum past
     `MAX_CHUNK_SUM` (a logit above m + 50) is redone the general way, so nothing can overflow.
   - peaked posterior (low noise; most weights underflow to 0): the *general* path keeps a running max per chunk,
     and its weighted sum gathers only the images that still have a weight in some row.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch

from .online_softmax import OnlineSoftmax, exp_weights_
from .stored_images import other_class_mask, piece_size

SMALL_BATCH = 32  # batches up to this many rows split the images into blocks, one per torch thread
MIN_IMAGES_PER_BLOCK = 1024  # ... when every block gets at least this many images
BROAD_ACTIVE_FRACTION = 0.5  # fused path when this share of the first piece is within ACTIVE_LOGIT_RANGE of its max
ACTIVE_LOGIT_RANGE = 60.0
REFERENCE_MARGIN = 25.0  # fused reference m = max of the first piece + 25: the largest weight is >= e^-25
MAX_CHUNK_SUM = math.exp(50.0)  # a chunk whose weights sum to more (a logit above m + 50) is redone the general way


def num_blocks(num_images: int, batch_size: int) -> int:
    """G: blocks of images side by side in one batched GEMM (see the module docstring)."""
    if batch_size > SMALL_BATCH:
        return 1
    return max(1, min(torch.get_num_threads(), num_images // MIN_IMAGES_PER_BLOCK))


class _Blocks:
    """
    G contiguous blocks of n stored images, `[G, n, D]`, read as float32 stored values r in pieces, with their
    centred squared norms `[G, n]` and labels `[G, n]`.
    """

    def __init__(self, images, sq_norms, labels, start: int, num_blocks: int, count: int, chunk_size: int):
        stop = start + num_blocks * count
        self.values = images[start:stop].reshape(num_blocks, count, -1)  # r  [G, n, D] (a view)
        self.sq_norms = sq_norms[start:stop].reshape(num_blocks, count)  # ||y'_i||^2  [G, n]
        self.labels = None if labels is None else labels[start:stop].reshape(num_blocks, count)
        self.start, self.count = start, count
        self.piece_size = piece_size(images.device, chunk_size, images)
        self.buffer = None
        if self.values.dtype != torch.float32:
            self.buffer = torch.empty(num_blocks, self.piece_size, self.values.shape[2], device=images.device)

    def pieces(self, start: int, stop: int) -> Iterator[tuple[int, torch.Tensor]]:
        """`(offset from start, r [G, p, D])` for images start..stop of every block; a piece is overwritten by the next."""
        for piece_start in range(start, stop, self.piece_size):
            piece = self.values[:, piece_start : min(piece_start + self.piece_size, stop)]
            if self.buffer is not None:
                piece = self.buffer[:, : piece.shape[1]].copy_(piece)
            yield piece_start - start, piece

    def other_class(self, class_labels, start: int, stop: int) -> torch.Tensor | None:
        """`[G, B, n]`, True where image i's label differs from row b's requested class; None without classes."""
        if class_labels is None:
            return None
        return other_class_mask(self.labels[:, None, start:stop], class_labels[None, :, None])

    def logits(self, query, neg_c2, class_labels, start: int, stop: int) -> torch.Tensor:
        """logits_i = query . r_i - c2 ||y'_i||^2 for images start..stop of every block, `[G, B, n]` (-inf off-class)."""
        bias = neg_c2[None, :, None] * self.sq_norms[:, None, start:stop]  # -c2 ||y'_i||^2  [G, B, n]
        queries = query.expand(len(self.values), -1, -1)  # [G, B, D]
        # one batched GEMM per piece, each into a fresh contiguous [G, B, p] (a strided output is slower)
        logits = [
            torch.baddbmm(bias[:, :, offset : offset + piece.shape[1]], queries, piece.transpose(1, 2))
            for offset, piece in self.pieces(start, stop)
        ]
        logits = torch.cat(logits, dim=2) if len(logits) > 1 else logits[0]
        other_class = self.other_class(class_labels, start, stop)
        if other_class is not None:
            logits.masked_fill_(other_class, float("-inf"))
        return logits


def fits_one_piece(images: torch.Tensor, chunk_size: int) -> bool:
    """Whether all stored images fit in one piece (`stored_images.piece_size`): the one-GEMM path (step 0 above)."""
    return piece_size(images.device, chunk_size, images) >= len(images)


def _one_piece_logits(query, neg_c2, images, sq_norms, labels, class_labels) -> tuple[torch.Tensor, torch.Tensor]:
    """`(logits [B, N], r [N, D])`: logits_i = query . r_i - c2 ||y'_i||^2 over all images (-inf off-class)."""
    values = images.reshape(len(images), -1).to(torch.float32)  # r  [N, D]
    logits = torch.addmm(torch.outer(neg_c2, sq_norms), query, values.T)  # [B, N]
    if class_labels is not None:
        logits.masked_fill_(other_class_mask(labels[None, :], class_labels[:, None]), float("-inf"))
    return logits, values


def _block_layouts(num_images: int, batch_size: int) -> list[tuple[int, int, int]]:
    """`[(start, G, n)]`: G blocks of n images from `start`; the < G images left over form one more block."""
    blocks = num_blocks(num_images, batch_size)
    count = num_images // blocks
    layouts = [(0, blocks, count)]
    if blocks * count < num_images:
        layouts.append((blocks * count, 1, num_images - blocks * count))
    return layouts


# ---------------------------------------------------------------------------------------------- posterior mean
def softmax_state(query, neg_c2, images, sq_norms, chunk_size, labels=None, class_labels=None) -> OnlineSoftmax:
    """
    The online-softmax state `[B]` of the posterior over all `images` with values r_i (stored values), for the
    logits query . r_i - c2 ||y'_i||^2 (see `kernels.empirical`): blocks, pieces, fused or general path.
    """
    softmax = OnlineSoftmax()
    if fits_one_piece(images, chunk_size):
        logits, values = _one_piece_logits(query, neg_c2, images, sq_norms, labels, class_labels)
        softmax.update(logits, lambda weights: weights @ values)  # sum_i w_i r_i  [B, D]
        return softmax
    for start, blocks, count in _block_layouts(len(images), len(query)):
        block = _Blocks(images, sq_norms, labels, start, blocks, count, chunk_size)
        softmax.merge(_block_state(block, query, neg_c2, chunk_size, class_labels).merge_leading())
    return softmax


def _block_state(block: _Blocks, query, neg_c2, chunk_size, class_labels) -> OnlineSoftmax:
    """The state `[G, B]` over the images of every block."""
    chunk = min(chunk_size, block.count)
    reference = _broad_posterior_reference(block, query, neg_c2, class_labels)
    if reference is not None:
        return _fused_state(block, query, neg_c2, chunk, class_labels, reference)
    softmax = OnlineSoftmax()
    for start in range(0, block.count, chunk):
        _general_update(softmax, block, query, neg_c2, class_labels, start, min(start + chunk, block.count))
    return softmax


def _broad_posterior_reference(block: _Blocks, query, neg_c2, class_labels) -> torch.Tensor | None:
    """
    The fused path's reference m `[G, B]` (max logit of each block's first piece + `REFERENCE_MARGIN`), or None for
    the general path: when fewer than `BROAD_ACTIVE_FRACTION` of the first pieces' images are within
    `ACTIVE_LOGIT_RANGE` of their row's max in some row (a peaked posterior), or a row has no image of its class there.
    """
    stop = min(block.piece_size, block.count)
    logits = block.logits(query, neg_c2, class_labels, 0, stop)  # [G, B, p]
    top = logits.amax(dim=2)  # [G, B]
    if not bool(torch.isfinite(top).all()):
        return None
    active = (logits > (top - ACTIVE_LOGIT_RANGE)[:, :, None]).any(dim=1)  # [G, p]
    if active.float().mean().item() < BROAD_ACTIVE_FRACTION:
        return None
    return top + REFERENCE_MARGIN


def _fused_state(block: _Blocks, query, neg_c2, chunk, class_labels, reference) -> OnlineSoftmax:
    """
    The state `[G, B]` with the fixed reference m: per piece, w_i = exp(l_i - m) (logits GEMM, exp) and its weighted
    sum (second GEMM) while the piece is in cache. A chunk whose weights sum past `MAX_CHUNK_SUM` in some row (or to
    NaN) is redone with the general update.
    """
    num_blocks, batch_size, dim = len(block.values), len(query), query.shape[1]
    queries = query.expand(num_blocks, -1, -1)  # [G, B, D]
    piece_weights_buffer = torch.empty(num_blocks, batch_size, block.piece_size, device=query.device)
    chunk_acc = torch.empty(num_blocks, batch_size, dim, device=query.device)  # sum_i w_i r_i of a chunk
    chunk_sum = torch.empty(num_blocks, batch_size, device=query.device)  # sum_i w_i of a chunk
    fused, redone = OnlineSoftmax(), OnlineSoftmax()
    fused.max = reference
    fused.sum = torch.zeros_like(reference)
    fused.acc = torch.zeros(num_blocks, batch_size, dim, device=query.device)
    for start in range(0, block.count, chunk):
        stop = min(start + chunk, block.count)
        other_class = block.other_class(class_labels, start, stop)
        chunk_acc.zero_()
        chunk_sum.zero_()
        for offset, piece in block.pieces(start, stop):
            count = piece.shape[1]
            weights = piece_weights_buffer[:, :, :count]  # [G, B, p]
            # w_i = exp(query . r_i - c2 ||y'_i||^2 - m)
            first = start + offset
            torch.mul(neg_c2[None, :, None], block.sq_norms[:, None, first : first + count], out=weights)
            exp_weights_(weights.sub_(reference[:, :, None]).baddbmm_(queries, piece.transpose(1, 2)))
            if other_class is not None:
                weights.masked_fill_(other_class[:, :, offset : offset + count], 0.0)
            chunk_acc.baddbmm_(weights, piece)
            chunk_sum += weights.sum(dim=2)
        if bool((chunk_sum <= MAX_CHUNK_SUM).all()):  # (False for NaN; and sum_i w_i r_i <= e^50 max|r| is finite)
            fused.sum += chunk_sum
            fused.acc += chunk_acc
        else:
            _general_update(redone, block, query, neg_c2, class_labels, start, stop)
    fused.merge(redone)
    return fused


def _general_update(softmax, block: _Blocks, query, neg_c2, class_labels, start, stop) -> None:
    """One chunk of the online softmax with a running max: `[G, B]` rows, values r_i."""
    logits = block.logits(query, neg_c2, class_labels, start, stop)  # [G, B, n]
    softmax.update(logits, lambda weights: _sparse_weighted_sum(weights, block, start, stop))


def _sparse_weighted_sum(weights: torch.Tensor, block: _Blocks, start: int, stop: int) -> torch.Tensor:
    """
    `sum_i w_i r_i` `[G, B, D]` over images start..stop, skipping the images whose weight is exactly 0 in every row
    (at low noise most of a chunk): gathered per block when at most half of the images are left. Exact.
    """
    num_blocks, batch_size, _ = weights.shape
    total = torch.zeros(num_blocks, batch_size, block.values.shape[2], device=weights.device)  # [G, B, D]
    active = weights.amax(dim=1) > 0  # [G, n]
    if int(active.sum()) <= active.numel() // 2:
        for g in range(num_blocks):
            for part in torch.nonzero(active[g]).flatten().split(block.piece_size):
                rows = block.values[g, start + part].to(torch.float32)  # [k, D]
                total[g].addmm_(weights[g][:, part], rows)
        return total
    for offset, piece in block.pieces(start, stop):
        total.baddbmm_(weights[:, :, offset : offset + piece.shape[1]], piece)
    return total


# ---------------------------------------------------------------------------------------------- nearest image
def nearest_state(query, neg_a, images, sq_norms, chunk_size, labels=None, class_labels=None):
    """
    `(index [B], score [B])`: the image with the highest query . r_i - a ||y'_i||^2 (the lowest score, its negative)
    over all `images`, the lower index on ties, as `kernels.empirical.nearest_indices` defines it.
    """
    if fits_one_piece(images, chunk_size):
        neg_scores, _ = _one_piece_logits(query, neg_a, images, sq_norms, labels, class_labels)
        best, index = neg_scores.max(dim=1)  # (the lower index on ties)
        return index, -best
    best_index = best_score = None
    for start, blocks, count in _block_layouts(len(images), len(query)):
        block = _Blocks(images, sq_norms, labels, start, blocks, count, chunk_size)
        chunk = min(chunk_size, count)
        block_score = torch.full((blocks, len(query)), float("inf"), device=query.device)
        block_index = torch.zeros(blocks, len(query), dtype=torch.int64, device=query.device)
        for chunk_start in range(0, count, chunk):
            chunk_stop = min(chunk_start + chunk, count)
            neg_scores = block.logits(query, neg_a, class_labels, chunk_start, chunk_stop)  # [G, B, n]
            chunk_best, chunk_index = neg_scores.max(dim=2)  # [G, B]
            better = -chunk_best < block_score
            block_score = torch.where(better, -chunk_best, block_score)
            block_index = torch.where(better, chunk_index + chunk_start, block_index)
        block_index += start + count * torch.arange(blocks, device=query.device)[:, None]  # global indices
        for score, index in zip(block_score, block_index):  # blocks in order: on a tie the lower index stays
            if best_score is None:
                best_score, best_index = score, index
                continue
            better = score < best_score
            best_score = torch.where(better, score, best_score)
            best_index = torch.where(better, index, best_index)
    return best_index, best_score
