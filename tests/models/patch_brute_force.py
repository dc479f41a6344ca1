"""Independent float64 brute force of the LS and ELS machines (explicit loops over patch positions and offsets),
written from the formulas of arXiv 2412.20292, for the tests of both machines."""

import math

import torch


def model_space(images: torch.Tensor) -> torch.Tensor:
    return images.double() / 127.5 - 1 if images.dtype == torch.uint8 else images.double()


def patch(images: torch.Tensor, y: int, x: int, k: int, padding: str) -> torch.Tensor:
    """
    P_(y, x)(z) for every image z, `[N, C k k]` in (channel, row, column) order: the rows y - r .. y + r and columns
    x - r .. x + r, wrapped around (circular) or read as zero outside the image (zeros).
    """
    r = k // 2
    height, width = images.shape[-2:]
    rows, cols = torch.arange(y - r, y + r + 1), torch.arange(x - r, x + r + 1)
    if padding == "circular":
        values = images[:, :, rows % height][:, :, :, cols % width]
    else:
        inside = ((rows >= 0) & (rows < height))[:, None] & ((cols >= 0) & (cols < width))[None, :]  # [k, k]
        values = images[:, :, rows.clamp(0, height - 1)][:, :, :, cols.clamp(0, width - 1)] * inside
    return values.reshape(len(images), -1)


def posterior_weights(query: torch.Tensor, patches: torch.Tensor, a: float) -> torch.Tensor:
    """softmax_j( -||query - sqrt(a) q_j||^2 / (2 (1 - a)) ) for query `[B, D]`, patches `[M, D]`: `[B, M]`."""
    distances = (query[:, None, :] - math.sqrt(a) * patches[None, :, :]).square().sum(dim=-1)
    return torch.softmax(-distances / (2 * (1 - a)), dim=1)


def ls_brute_force(x_t, images, a: float, k: int, padding: str) -> torch.Tensor:
    """x0_hat[p] = sum_i w_p(i) y_i[p], w_p(i) from the patches of x_t and y_i at p (both padded alike)."""
    x, y = x_t.double(), model_space(images)
    out = torch.zeros_like(x)
    height, width = x.shape[-2:]
    for py in range(height):
        for px in range(width):
            weights = posterior_weights(patch(x, py, px, k, padding), patch(y, py, px, k, padding), a)  # [B, N]
            out[:, :, py, px] = weights @ y[:, :, py, px]
    return out


def overflow(position: int, size: int, r: int) -> tuple[int, int]:
    return (max(0, r - position), max(0, position + r - (size - 1)))


def training_positions(py: int, px: int, height: int, width: int, k: int, padding: str, boundary_aware: bool):
    """The positions whose training patches pixel (py, px) is compared with (the rule in the ELS docstring)."""
    r = k // 2
    everywhere = [(y, x) for y in range(height) for x in range(width)]
    if padding == "circular":
        return everywhere
    if not boundary_aware:
        return [(y, x) for y, x in everywhere if overflow(y, height, r) == (0, 0) and overflow(x, width, r) == (0, 0)]
    own = (overflow(py, height, r), overflow(px, width, r))
    return [(y, x) for y, x in everywhere if (overflow(y, height, r), overflow(x, width, r)) == own]


def els_brute_force(x_t, images, a: float, k: int, padding: str, boundary_aware: bool = False) -> torch.Tensor:
    """x0_hat[p] = sum_j w_p(j) center(q_j) over the training patches q_j allowed for p."""
    x, y = x_t.double(), model_space(images)
    out = torch.zeros_like(x)
    height, width = x.shape[-2:]
    cache = {}
    for py in range(height):
        for px in range(width):
            positions = training_positions(py, px, height, width, k, padding, boundary_aware)
            key = tuple(positions)
            if key not in cache:
                patches = torch.cat([patch(y, ty, tx, k, padding) for ty, tx in positions])  # [M, C k k]
                centers = torch.cat([y[:, :, ty, tx] for ty, tx in positions])  # [M, C]
                cache[key] = (patches, centers)
            patches, centers = cache[key]
            out[:, :, py, px] = posterior_weights(patch(x, py, px, k, padding), patches, a) @ centers
    return out


def els_valid_patches_brute_force(x_t, images, a: float, k: int, padding: str = "circular") -> torch.Tensor:
    """
    The authors' circular ELS machine (`LocalEquivScoreModule` of github.com/Kambm/convolutional_diffusion) from its
    definition: the patch around each pixel of x_t padded circularly (or with zeros), against every valid patch of
    every training image, cut at each top-left corner (u, v) with u <= H - k, v <= W - k (no wrap-around); the value of
    a patch is its centre pixel.
    """
    x, y = x_t.double(), model_space(images)
    height, width = x.shape[-2:]
    r = k // 2
    patches, centers = [], []
    for u in range(height - k + 1):
        for v in range(width - k + 1):
            patches.append(y[:, :, u : u + k, v : v + k].reshape(len(y), -1))  # [N, C k k]
            centers.append(y[:, :, u + r, v + r])  # [N, C]
    patches, centers = torch.cat(patches), torch.cat(centers)
    out = torch.zeros_like(x)
    for py in range(height):
        for px in range(width):
            out[:, :, py, px] = posterior_weights(patch(x, py, px, k, padding), patches, a) @ centers
    return out


def optimal_brute_force(x_t, images, a: float) -> torch.Tensor:
    """The optimal (empirical Bayes) posterior mean over whole images, float64."""
    x, y = x_t.double().flatten(1), model_space(images).flatten(1)
    return (posterior_weights(x, y, a) @ y).reshape(x_t.shape)


def relative_error(result: torch.Tensor, reference: torch.Tensor) -> float:
    return ((result.double() - reference).norm() / reference.norm()).item()
