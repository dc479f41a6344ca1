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


# ---------------------------------------------------------------------------------------------- data-holding denoisers
# The optimal (empirical Bayes), smoothed CFDM and nearest-dataset denoisers keep the training images y_1 .. y_N as a
# buffer and stream over it in chunks. The math below is shared by importing these functions.
#
# Centring. Distances are invariant to a common shift: ||x_t - sqrt(a) y_i|| = ||x' - sqrt(a) y'_i|| with
# x' = x_t - sqrt(a) mu and y'_i = y_i - mu (mu the data mean). The GEMM form of the distance cancels large terms,
# ||x'||^2 - 2 sqrt(a) x'.y'_i + a ||y'_i||^2, so working with centred vectors (smaller norms) keeps float32 rounding
# of the logits small; the centring is fused into the uint8 -> float conversion and costs nothing extra.


def image_storage(num_images: int, shape: tuple[int, int, int], storage_dtype: str) -> torch.Tensor:
    """An empty image buffer `[num_images, C, H, W]` of the storage dtype (`"uint8"`, `"float16"` or `"float32"`)."""
    if storage_dtype not in STORAGE_DTYPES:
        raise ValueError(f"`storage_dtype` must be one of {sorted(STORAGE_DTYPES)}, got {storage_dtype!r}.")
    if int(num_images) < 1:
        raise ValueError(f"`num_images` must be a positive integer, got {num_images}.")
    return torch.zeros(int(num_images), *shape, dtype=STORAGE_DTYPES[storage_dtype])


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

    def get(self, images: torch.Tensor, chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """`(mean [D], sq_norms [N])` of `images` `[N, C, H, W]`, computed at first use after a change."""
        key = (images.data_ptr(), images.device, images.dtype, tuple(images.shape), images._version)
        if key != self._key:
            total = torch.zeros(images[0].numel(), dtype=torch.float64, device=images.device)
            for _, chunk in image_chunks(images, chunk_size):
                total += chunk.sum(dim=0, dtype=torch.float64)
            mean64 = total / len(images)  # [D]
            sq_norms = torch.empty(len(images), dtype=torch.float32, device=images.device)
            for start, chunk in image_chunks(images, chunk_size):
                sq_norms[start : start + len(chunk)] = (chunk.double() - mean64).square().sum(dim=1).float()
            self.mean, self.sq_norms, self._key = mean64.float(), sq_norms, key
        return self.mean, self.sq_norms


def centered_chunks(
    images: torch.Tensor, mean: torch.Tensor, chunk_size: int, indices: torch.Tensor | None = None
) -> Iterator[tuple[int, torch.Tensor]]:
    """
    Yields `(offset, y' chunk)`, the chunk float32 `[n, D]` = model-space images minus `mean`, converted from the
    stored dtype in one pass into one reused buffer (so memory is one chunk whatever N). The chunk is overwritten by
    the next one: use it before advancing. `indices` selects a subset; offsets index into it.
    """
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer, got {chunk_size}.")
    total = len(images) if indices is None else len(indices)
    flat = images.reshape(len(images), -1)
    buffer = torch.empty(min(chunk_size, total), flat.shape[1], dtype=torch.float32, device=images.device)
    shift = -1.0 - mean  # uint8 v -> v / 127.5 - 1 - mu, one fused pass  [D]
    for start in range(0, total, chunk_size):
        stop = min(start + chunk_size, total)
        stored = flat[start:stop] if indices is None else flat[indices[start:stop]]
        chunk = buffer[: stop - start]
        if stored.dtype == torch.uint8:
            torch.add(shift, stored, alpha=1.0 / 127.5, out=chunk)
        else:
            torch.sub(stored, mean, out=chunk)
        yield start, chunk


def _logit_coefficients(alpha_prod: torch.Tensor, beta_prod: torch.Tensor, temperature: float):
    """
    The logits -||x' - sqrt(a) y'||^2 / (2 (1 - a) tau), less the x-only term, are
    c1 (x'.y') - c2 ||y'||^2 with c1 = sqrt(a) / ((1 - a) tau), c2 = a / (2 (1 - a) tau): float64 -> float32 `[B, 1]`.
    1 - a is floored at 1e-20 so that a schedule with 1 - a = 0 gives a one-hot (nearest image) posterior, not NaN.
    """
    scale = 1.0 / (2.0 * beta_prod.double().clamp(min=1e-20) * temperature)  # 1 / (2 (1 - a) tau)
    c1 = 2.0 * alpha_prod.double().sqrt() * scale
    c2 = alpha_prod.double() * scale
    return c1.float()[:, None], c2.float()


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
    indices: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""
    The posterior mean under the empirical distribution of `images` (DESIGN.md section 2, "Optimal"):

        w_i = softmax_i( -||x_t - sqrt(a) y_i||^2 / (2 (1 - a) tau) ),   x0_hat = sum_i w_i y_i

    exact, streamed over chunks of `chunk_size` images with an online softmax: per chunk one GEMM for the logits and
    one for the weighted sum; extra memory O(B * chunk_size + chunk_size * D) whatever N.

    Args:
        x_t (`torch.Tensor`): float32 `[B, D]`.
        alpha_prod, beta_prod (`torch.Tensor`): a and 1 - a, `[B]` (float64 preferred).
        images (`torch.Tensor`): the stored images `[N, C, H, W]` (uint8 `[0, 255]` or float model space).
        stats: `(mean [D], sq_norms [N])` from [`StoredImageStats`].
        chunk_size (`int`): images per chunk.
        temperature (`float`): tau > 0; 1 is the exact posterior.
        labels, class_labels (`torch.Tensor`, *optional*): stored labels `[N]` and one label per sample `[B]`:
            sample b's posterior is restricted to the images of its class (other logits are -inf).
        indices (`torch.Tensor`, *optional*): restrict the sum to these images (e.g. the top-k neighbours).

    Returns:
        `torch.Tensor`: x0_hat, float32 `[B, D]`.
    """
    mean, sq_norms = stats
    if indices is not None:
        sq_norms = sq_norms[indices]
        labels = None if labels is None else labels[indices]
    c1, c2 = _logit_coefficients(alpha_prod, beta_prod, temperature)
    sqrt_a = alpha_prod.double().sqrt().float()[:, None]
    # 1. Centre and pre-scale the query: c1 x', x' = x_t - sqrt(a) mu.
    query = (x_t - sqrt_a * mean) * c1  # [B, D]
    neg_c2 = -c2.to(x_t.device)  # [B]
    if class_labels is not None:
        class_labels = class_labels.to(x_t.device)
    softmax = OnlineSoftmax()
    for start, chunk in centered_chunks(images, mean, chunk_size, indices):
        # 2. logits_i = c1 x'.y'_i - c2 ||y'_i||^2 (||x'||^2 is constant over i and cancels).
        logits = query @ chunk.T  # [B, n]
        logits.addr_(neg_c2, sq_norms[start : start + len(chunk)])
        if class_labels is not None:
            other_class = labels[start : start + len(chunk)][None, :] != class_labels[:, None]  # [B, n]
            logits.masked_fill_(other_class, float("-inf"))
        # 3. Online softmax: running max, running sum, running sum_i w_i y'_i.
        softmax.update(logits, lambda weights, chunk=chunk: weights @ chunk)
    # 4. x0_hat = sum_i w_i y'_i + mu (the weights sum to 1).
    return softmax.result() + mean


def nearest_indices(
    x_t: torch.Tensor,
    alpha_prod: torch.Tensor,
    images: torch.Tensor,
    stats: tuple[torch.Tensor, torch.Tensor],
    chunk_size: int,
    labels: torch.Tensor | None = None,
    class_labels: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    `argmin_i ||x_t - sqrt(a) y_i||^2` for each row of `x_t` float32 `[B, D]`, exact, streamed over chunks (the
    score a ||y'_i||^2 - 2 sqrt(a) x'.y'_i differs from the squared distance by a per-row constant). With
    `labels` / `class_labels`, only images of each sample's class compete. Returns int64 `[B]` (ties: lowest index).
    """
    mean, sq_norms = stats
    a = alpha_prod.double()
    two_sqrt_a = (2.0 * a.sqrt()).float()[:, None]
    query = (x_t - (a.sqrt().float()[:, None]) * mean) * two_sqrt_a  # 2 sqrt(a) x'  [B, D]
    a32 = a.float().to(x_t.device)
    if class_labels is not None:
        class_labels = class_labels.to(x_t.device)
    best_score = torch.full((len(x_t),), float("inf"), device=x_t.device)
    best_index = torch.zeros(len(x_t), dtype=torch.int64, device=x_t.device)
    for start, chunk in centered_chunks(images, mean, chunk_size):
        scores = torch.outer(a32, sq_norms[start : start + len(chunk)]) - query @ chunk.T  # [B, n]
        if class_labels is not None:
            other_class = labels[start : start + len(chunk)][None, :] != class_labels[:, None]
            scores.masked_fill_(other_class, float("inf"))
        chunk_score, chunk_index = scores.min(dim=1)
        better = chunk_score < best_score
        best_score = torch.where(better, chunk_score, best_score)
        best_index = torch.where(better, chunk_index + start, best_index)
    return best_index


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
    patches = windows.permute(0, 2, 3, 1, 4, 5).reshape(count, -1, channels * patch_size * patch_size)  # [n, H W, C k k]
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
