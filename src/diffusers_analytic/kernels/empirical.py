r"""The empirical posterior: posterior mean and nearest image under the empirical distribution of stored images
y_1 .. y_N (the optimal, smoothed CFDM and nearest-dataset denoisers).

    w_i = softmax_i( -||x_t - sqrt(a) y_i||^2 / (2 (1 - a) tau) ),   x0_hat = sum_i w_i y_i
    i*  = argmin_i ||x_t - sqrt(a) y_i||^2

Streaming form of the logits. With mu the data mean, x' = x_t - sqrt(a) mu and y'_i = y_i - mu,

    -||x_t - sqrt(a) y_i||^2 / (2 (1 - a) tau) = c1 x'.y_i - c2 ||y'_i||^2 + (terms without i),
    c1 = sqrt(a) / ((1 - a) tau),   c2 = a / (2 (1 - a) tau),

and terms without i cancel in the softmax (and the argmin): one GEMM per chunk of images plus the precomputed
||y'_i||^2. Centring on mu keeps the magnitudes, and so the float32 rounding of the logits, small.

`posterior_mean` and `nearest_indices` below are plain streamed loops over chunks of images, exact for any chunk
size (an online softmax). On a CPU they hand the same computation to `kernels.empirical_cpu`, which arranges it for
caches and cores (exact as well); the plain loops serve every other device.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from . import empirical_cpu
from .online_softmax import OnlineSoftmax
from .schedule import MIN_BETA_PROD
from .stored_images import image_chunks, other_class_mask, piece_size, storage_affine


def logit_coefficients(
    alpha_prod: torch.Tensor, beta_prod: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `(c1, c2)` = `(sqrt(a) / ((1 - a) tau), a / (2 (1 - a) tau))`, computed in float64 on the CPU (float64 is not
    available on every accelerator) and returned as float32 `[B]`. 1 - a is floored at `MIN_BETA_PROD`, so 1 - a = 0
    gives a one-hot (nearest image) posterior instead of NaN.
    """
    alpha_prod, beta_prod = alpha_prod.detach().cpu().double(), beta_prod.detach().cpu().double()
    scale = 1.0 / (2.0 * beta_prod.clamp(min=MIN_BETA_PROD) * temperature)  # 1 / (2 (1 - a) tau)
    return (2.0 * alpha_prod.sqrt() * scale).float(), (alpha_prod * scale).float()


def logit_query(x_t, alpha_prod, beta_prod, mean, scale, temperature) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `(c1 s x' [B, D], -c2 [B])` for `x_t` float32 `[B, D]`, the data mean `mean` `[D]` and the storage scale s:
    logits_i = query . r_i - c2 ||y'_i||^2 for stored values r_i (y_i = s r_i + o).
    """
    c1, c2 = logit_coefficients(alpha_prod, beta_prod, temperature)
    sqrt_a = alpha_prod.detach().cpu().double().sqrt().float().to(x_t.device)  # [B]
    query = (x_t - sqrt_a[:, None] * mean) * (c1.to(x_t.device) * scale)[:, None]  # [B, D]
    return query, -c2.to(x_t.device)


def _other_class(labels, class_labels, start: int, stop: int) -> torch.Tensor | None:
    """`[B, n]`: True where image i (of start..stop) is not of row b's requested class; None without classes."""
    if class_labels is None:
        return None
    return other_class_mask(labels[None, start:stop], class_labels[:, None])


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
    cpu_fast_path: bool = True,
) -> torch.Tensor:
    r"""
    The posterior mean under the empirical distribution of `images` (module docstring), exact: streamed over chunks
    of `chunk_size` images with an online softmax, equal to the one-shot softmax over all N to float32 rounding.

    Args:
        x_t (`torch.Tensor`): float32 `[B, D]`.
        alpha_prod, beta_prod (`torch.Tensor`): a and 1 - a, `[B]` (float64 preferred).
        images (`torch.Tensor`): the stored images `[N, C, H, W]` (uint8 `[0, 255]` or float model space).
        stats: `(mean [D], sq_norms [N])` from [`~kernels.stored_images.StoredImageStats`].
        chunk_size (`int`): images per chunk (the logits of a chunk, `[B, chunk_size]`, are the extra memory).
        temperature (`float`): tau > 0; 1 is the exact posterior.
        labels, class_labels (`torch.Tensor`, *optional*): stored labels `[N]` and one label per row `[B]`: row b's
            posterior is restricted to the images of its class (not for a row labelled `ANY_CLASS`).
        reduce_softmax (`callable`, *optional*): applied to the online-softmax state before its result (a
            data-parallel shard all-reduces it there).
        cpu_fast_path (`bool`, defaults to `True`): on a CPU, compute through `kernels.empirical_cpu`.

    Returns:
        `torch.Tensor`: x0_hat, float32 `[B, D]`.
    """
    mean, sq_norms = stats
    if class_labels is not None:
        class_labels = class_labels.to(x_t.device)
    if cpu_fast_path and x_t.device.type == "cpu":
        # The same logits over the stored values r_i (y_i = s r_i + o), without decoding the images.
        scale, offset = storage_affine(images.dtype)
        query, neg_c2 = logit_query(x_t, alpha_prod, beta_prod, mean, scale, temperature)
        softmax = empirical_cpu.softmax_state(query, neg_c2, images, sq_norms, chunk_size, labels, class_labels)
    else:
        scale, offset = 1.0, 0.0
        query, neg_c2 = logit_query(x_t, alpha_prod, beta_prod, mean, 1.0, temperature)  # c1 x' [B, D], -c2 [B]
        softmax = OnlineSoftmax()
        for start, y in image_chunks(images, chunk_size, device=x_t.device):  # y_i in model space  [n, D]
            stop = start + len(y)
            logits = torch.addmm(torch.outer(neg_c2, sq_norms[start:stop]), query, y.T)  # c1 x'.y_i - c2 ||y'_i||^2
            other_class = _other_class(labels, class_labels, start, stop)
            if other_class is not None:
                logits.masked_fill_(other_class, float("-inf"))
            softmax.update(logits, lambda weights, y=y: weights @ y)  # [B, n] -> sum_i w_i y_i  [B, D]
    if reduce_softmax is not None:
        softmax = reduce_softmax(softmax)
    x0_hat = softmax.result()  # [B, D]
    if scale != 1.0 or offset != 0.0:
        x0_hat = x0_hat.mul_(scale).add_(offset)  # sum_i w_i y_i = s sum_i w_i r_i + o
    return x0_hat


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
    [`posterior_mean`] with each row's softmax restricted to its own candidate images: `neighbors` int64 `[B, k]`
    (indices into `images`; -1 marks an empty slot). The same logits, batched over rows and streamed over the k
    candidates in slices of about four pieces of images in all, whatever k. Returns float32 `[B, D]`.
    """
    mean, sq_norms = stats
    batch_size, k = neighbors.shape
    scale, offset = storage_affine(images.dtype)
    query, neg_c2 = logit_query(x_t, alpha_prod, beta_prod, mean, scale, temperature)  # c1 s x' [B, D], -c2 [B]
    flat = images.reshape(len(images), -1)
    neighbors = neighbors.to(x_t.device)
    step = max(1, 4 * piece_size(x_t.device, chunk_size, images) // batch_size)  # candidates per row and slice
    softmax = OnlineSoftmax()
    for start in range(0, k, step):
        ids = neighbors[:, start : start + step]  # [B, n]
        safe_ids = ids.clamp(min=0)
        values = flat[safe_ids].to(torch.float32)  # r  [B, n, D]
        logits = torch.bmm(values, query[:, :, None]).squeeze(-1) + neg_c2[:, None] * sq_norms[safe_ids]  # [B, n]
        logits.masked_fill_(ids < 0, float("-inf"))
        softmax.update(logits, lambda weights, values=values: torch.bmm(weights[:, None, :], values).squeeze(1))
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
    cpu_fast_path: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    """
    `argmin_i ||x_t - sqrt(a) y_i||^2` for each row of `x_t` float32 `[B, D]`, exact, streamed over chunks: the score
    a ||y'_i||^2 - 2 sqrt(a) x'.y_i differs from the squared distance by a per-row constant (module docstring). With
    `labels` / `class_labels`, only images of each row's class compete; on a tie the lower index wins.

    Returns:
        `(indices [B] int64, scores [B])` (a data-parallel shard compares the scores across processes).
    """
    mean, sq_norms = stats
    a = alpha_prod.detach().cpu().double()
    sqrt_a = a.sqrt().float().to(x_t.device)
    neg_a = -a.float().to(x_t.device)
    if class_labels is not None:
        class_labels = class_labels.to(x_t.device)
    if cpu_fast_path and x_t.device.type == "cpu":
        scale, _ = storage_affine(images.dtype)
        query = (x_t - sqrt_a[:, None] * mean) * (2.0 * a.sqrt() * scale).float()[:, None]  # 2 sqrt(a) s x'  [B, D]
        return empirical_cpu.nearest_state(query, neg_a, images, sq_norms, chunk_size, labels, class_labels)
    query = (x_t - sqrt_a[:, None] * mean) * (2.0 * sqrt_a)[:, None]  # 2 sqrt(a) x'  [B, D]
    best_score = torch.full((len(x_t),), float("inf"), device=x_t.device)
    best_index = torch.zeros(len(x_t), dtype=torch.int64, device=x_t.device)
    for start, y in image_chunks(images, chunk_size, device=x_t.device):
        stop = start + len(y)
        scores = torch.addmm(torch.outer(-neg_a, sq_norms[start:stop]), query, y.T, alpha=-1)  # [B, n]
        other_class = _other_class(labels, class_labels, start, stop)
        if other_class is not None:
            scores.masked_fill_(other_class, float("inf"))
        chunk_score, chunk_index = scores.min(dim=1)
        better = chunk_score < best_score  # (strict: on a tie the earlier chunk's lower index stays)
        best_score = torch.where(better, chunk_score, best_score)
        best_index = torch.where(better, chunk_index + start, best_index)
    return best_index, best_score
