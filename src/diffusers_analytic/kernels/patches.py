"""Patches for the patch machines (LS / ELS of Kamb & Ganguli, arXiv 2412.20292): padding, k x k windows around
every pixel, window sums, and which training positions each query position is compared with."""

from __future__ import annotations

import torch

# Patches of odd size k = 2 r + 1 (all channels) around each pixel, for the local score (LS) and equivariant local
# score (ELS) machines of Kamb & Ganguli (arXiv 2412.20292). Padding rules: "zeros" pads with zeros, "circular" wraps
# around (any radius, also r >= H). Positions are flat indices p = y * W + x of the un-padded image.
PATCH_PADDINGS = ("zeros", "circular")

# Which training patches the ELS machine compares a query patch with, per padding (the first is the default):
# "wrapped" = all H W patches of the circularly padded image, "valid" = the (H - k + 1) (W - k + 1) patches that lie
# inside the image. Zero padding has only "valid" (boundary_aware then changes what border pixels see).
TRAINING_PATCHES = {"circular": ("wrapped", "valid"), "zeros": ("valid",)}


def resolve_training_patches(padding: str, training_patches: str | None) -> str:
    """`training_patches` checked against `padding` (None -> that padding's default); a ValueError names the fix."""
    if padding not in PATCH_PADDINGS:
        raise ValueError(f"`padding` must be one of {PATCH_PADDINGS}, got {padding!r}.")
    allowed = TRAINING_PATCHES[padding]
    if training_patches is None:
        return allowed[0]
    if training_patches not in allowed:
        fix = "; 'wrapped' needs padding='circular'" if training_patches == "wrapped" else ""
        raise ValueError(
            f"`training_patches` must be one of {list(allowed)} with padding={padding!r}, got {training_patches!r}{fix}."
        )
    return training_patches


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
    height: int,
    width: int,
    patch_size: int,
    padding: str,
    boundary_aware: bool,
    training_patches: str | None = None,
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """
    Which training patches each query pixel's patch is compared with in the ELS machine: a list of
    `(query positions, training positions)` pairs of flat pixel indices (a position is a patch's centre). Training
    patches come from every stored image at every training position of the pair.

    - `"circular"`, `training_patches="wrapped"` (its default): one group; every pixel against the patches at all
      H W positions (wrapped).
    - `"circular"`, `training_patches="valid"`, or `"zeros"`: one group; every pixel (its patch padded circularly, or
      with zeros) against the valid patches, those that lie inside the image: (H - k + 1) (W - k + 1) positions.
    - `"zeros"` with `boundary_aware`: pixels are grouped by how far their window overflows each border, the pair
      (top, bottom) overflow per row, max(0, r - y) and max(0, y + r - (H - 1)), and likewise per column. A pixel is
      compared with the patches of the zero-padded training images at the positions of its own group: interior
      pixels (no overflow) with all valid patches, a pixel near an edge with the patches at the same distance from
      that edge anywhere along it, a corner pixel with the patches at that corner only.
    """
    radius = patch_size // 2
    training_patches = resolve_training_patches(padding, training_patches)
    if boundary_aware and padding != "zeros":
        raise ValueError(
            f"`boundary_aware=True` needs zero padding (circular images have no border), got {padding!r}."
        )
    if training_patches == "wrapped":
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
                f"{min(height, width)}, wrapped circular patches or boundary_aware=True."
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
