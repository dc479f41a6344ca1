"""The locality mask of PCA locality (Lukoianov et al. 2025, arXiv 2509.09672) and its tiling: which input pixels
each output pixel sees at one noise level, and how the masked distances are grouped into GEMMs."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

# The cost model that picks how the masked distances of one noise level are evaluated (`prepare_locality_mask`). All
# four evaluations do the same work per stored image, the logits of every (sample, output pixel) pair; they differ in
# how many multiply-adds that takes and at what rate they run. Costs are counted in multiply-adds of the dense GEMM
# `[B n, D] x [D, D]`, i.e. each evaluation's multiply-adds divided by its rate relative to that GEMM:
#
#   dense       B D^2                                   the GEMM itself (efficiency 1 by definition)
#   sparse      B nnz(M) / SPARSE_PRODUCT_EFFICIENCY    CSR M^T times the per-input terms z^T  [D, B n]
#   complement  B nnz(1 - M) / SPARSE_PRODUCT_EFFICIENCY + B D     the full row sum of z minus CSR (1 - M)^T z^T
#   tiles       (the tiling's own estimate, see `locality_tiles`) / TILE_EFFICIENCY
#
# SPARSE_PRODUCT_EFFICIENCY is the sparse product's multiply-add rate over the dense GEMM's, measured on the CPU
# (MKL, 2 cores, D = 3072, B n = 2048; benchmarks/README.md, "PCA locality: dense GEMM, sparse and complement
# products"): a CSR x dense product reads one row of the dense operand (B n floats) per non-zero, so it runs at memory
# speed, 0.10-0.14 of the GEMM's rate at 6-18% non-zeros (0.04-0.06 at 30-45%); 0.1 puts the break-even at 10%
# non-zeros (of M, or of 1 - M for nearly full masks), where the measured ratio holds. It is keyed by device type;
# where no rate was measured (GPUs, MPS) the sparse products are not used.
SPARSE_PRODUCT_EFFICIENCY = {"cpu": 0.1}
# Tiles (gathers and small GEMMs over the union of a tile's supports) run at about 0.45 of the dense GEMM's rate.
TILE_EFFICIENCY = 0.45
EVALUATION_PATHS = ("dense", "sparse", "complement", "tiles")


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
    blocks per side.
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
    The locality mask of PCA-locality (Lukoianov et al. 2025; docs/math.md) at one noise level `a`:

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
    used = gains != 0  # a direction with gain 0 adds nothing to W (a fit on N < D images has D - N + 1 of them)
    if not bool(used.all()):
        eigvecs, gains = eigvecs[:, used], gains[used]
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
    `sparse_advantage` is a measured ratio of multiply-add rates (sparse tiles against the dense GEMM; see
    benchmarks/README.md, PCA locality).

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


def tiling_cost(
    tiles: list, dim: int, batch_size: int, gather_cost: float = 64.0, tile_overhead: float = 2e4
) -> float:
    """The estimate `locality_tiles` minimises, for a given tiling: multiply-adds per stored image, at tile rate."""
    cost = sum(
        (dim if q_idx is None else len(q_idx)) * (len(p_idx) * (batch_size + 1) + gather_cost)
        for p_idx, q_idx, _ in tiles
    )
    cost += tile_overhead * len(tiles)
    if any(complement for *_, complement in tiles):
        cost += dim * (batch_size + 1)
    return float(cost)


@dataclass
class LocalityMask:
    """The mask of one noise level, prepared for the distance computation (see `prepare_locality_mask`)."""

    mask: torch.Tensor  # [D, D] bool (binarised) or float32 (soft R)
    tiles: list  # [(p_idx [P], q_idx [K] or None, complement)]: see `locality_tiles`
    nonzero_fraction: float  # share of non-zero mask entries
    path: str = "dense"  # "ones", "dense", "sparse", "complement" or "tiles": how the distances are evaluated
    sparse: torch.Tensor | None = None  # "sparse": CSR M^T; "complement": CSR (1 - M)^T; float32 [D, D]
    costs: dict = field(default_factory=dict)  # the cost model's estimate per candidate path (see above)

    @property
    def all_ones(self) -> bool:
        """The mask is all ones: the optimal denoiser."""
        return self.path == "ones"

    @property
    def dense(self) -> bool:
        """The dense formulation: one GEMM `[B n, D] x [D, D]` for all pixels."""
        return self.path == "dense"


def prepare_locality_mask(
    mask: torch.Tensor,
    sample_shape: tuple[int, int, int],
    batch_size: int = 8,
    paths: tuple[str, ...] = EVALUATION_PATHS,
    **tiling,
) -> LocalityMask:
    """
    A mask `[D, D]` (bool or float) with the evaluation the cost model above picks for it: the all-ones shortcut,
    the dense GEMM, a CSR product of the mask (`"sparse"`) or of its complement (`"complement"`), or tiles. A soft
    (float) mask is always dense.

    Args:
        mask (`torch.Tensor`): `[D, D]`, bool (binarised) or float32 (soft R).
        sample_shape (`(C, H, W)`): the image shape.
        batch_size (`int`): B, the samples that share the mask (it scales every cost alike but the tiles' data
            term).
        paths (`tuple[str]`): the candidates (all by default; restricting them is for tests and benchmarks: the result
            does not depend on it). `"dense"` is used when no candidate applies.
        **tiling: passed to `locality_tiles`.
    """
    dim = mask.shape[0]
    if mask.dtype != torch.bool:
        tiles = locality_tiles(mask, sample_shape, batch_size=batch_size, **tiling)
        return LocalityMask(mask, tiles, float((mask != 0).sum()) / mask.numel())
    nonzero = int(mask.sum())
    if nonzero == mask.numel():
        return LocalityMask(mask, [], 1.0, path="ones")

    costs = {"dense": float(batch_size * dim * dim)} if "dense" in paths else {}
    efficiency = SPARSE_PRODUCT_EFFICIENCY.get(mask.device.type)
    if efficiency is not None:
        if "sparse" in paths:
            costs["sparse"] = batch_size * nonzero / efficiency
        if "complement" in paths:
            costs["complement"] = batch_size * (mask.numel() - nonzero) / efficiency + batch_size * dim
    tiles = locality_tiles(mask, sample_shape, batch_size=batch_size, **tiling)
    if "tiles" in paths and any(q_idx is not None for _, q_idx, _ in tiles):
        costs["tiles"] = tiling_cost(tiles, dim, batch_size) / TILE_EFFICIENCY
    path = min(costs, key=costs.get) if costs else "dense"
    sparse = None
    if path in ("sparse", "complement"):
        support = mask if path == "sparse" else ~mask
        sparse = support.T.to(torch.float32).to_sparse_csr()  # rows: output pixels p, columns: inputs q
    return LocalityMask(mask, tiles, nonzero / mask.numel(), path=path, sparse=sparse, costs=costs)
