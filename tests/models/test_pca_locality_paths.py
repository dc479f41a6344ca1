"""PCA locality's evaluations of the masked distances (dense GEMM, CSR product of the mask or of its complement,
tiles), each forced on fresh random inputs against an independent float64 implementation, and the cost model that
picks one."""

import math

import pytest
import torch

from diffusers_analytic.models import pca_mask
from diffusers_analytic.models.denoiser_pca_locality import PCALocalityDenoiser
from diffusers_analytic.models.pca_mask import prepare_locality_mask

SHAPE = (3, 8, 8)
DIM = 192


def reference_x0(images, x_t, alpha_prod, mask):
    """x0_hat[p] = sum_i softmax_i(-d_p(i) / (2 (1 - a))) y_i[p], d_p(i) = sum_q M[q, p] (x[q] - sqrt(a) y_i[q])^2,
    written out per (sample, image, pixel) in float64: one softmax over all N."""
    x = x_t.double()
    differences = (x[:, None, :] - math.sqrt(alpha_prod) * images[None]) ** 2  # [B, N, D]
    distances = torch.einsum("bnq,qp->bnp", differences, mask.double())  # [B, N, D]
    weights = torch.softmax(-distances / (2 * (1 - alpha_prod)), dim=1)
    return (weights * images[None]).sum(1)


@pytest.fixture(scope="module")
def denoiser():
    generator = torch.Generator().manual_seed(11)
    data = torch.rand(300, *SHAPE, generator=generator) * 2 - 1
    return PCALocalityDenoiser.from_dataset(data, show_progress=False, chunk_size=128)


def random_mask(density, seed):
    return torch.rand(DIM, DIM, generator=torch.Generator().manual_seed(seed)) < density


@pytest.mark.parametrize(
    "path, density",
    [("dense", 0.5), ("sparse", 0.05), ("complement", 0.95), ("tiles", 0.05), ("tiles", 0.95)],
)
def test_forced_path_matches_float64_formula(denoiser, path, density):
    seed = int(1000 * density) + len(path)
    mask = random_mask(density, seed)
    entry = denoiser._prepare_mask(mask, 3, paths=(path,), variants=("direct", "complement"), max_tile_pixels=12)
    assert entry.path == path and not entry.all_ones
    if path in ("sparse", "complement"):
        support = mask if path == "sparse" else ~mask
        assert entry.sparse.layout == torch.sparse_csr
        assert torch.equal(entry.sparse.to_dense(), support.T.float())
    images = denoiser.images.reshape(len(denoiser.images), -1).double()  # float32 storage: exact in float64
    generator = torch.Generator().manual_seed(seed)
    for alpha_prod in (0.3, 0.9):
        x_t = math.sqrt(alpha_prod) * images[:3].float() + math.sqrt(1 - alpha_prod) * torch.randn(
            3, DIM, generator=generator
        )
        out = denoiser._denoise_group(x_t, alpha_prod, 1 - alpha_prod, mask=entry)
        expected = reference_x0(images, x_t, alpha_prod, mask)
        error = float((out.double() - expected).norm() / expected.norm())
        assert error <= 2e-6, (path, alpha_prod, error)


def test_cost_model_picks_the_cheapest_path():
    # the costs of pca_mask's comment, written out: B D^2; B nnz / e; B (D^2 - nnz) / e + B D; tiles / 0.45
    batch_size = 8
    efficiency = pca_mask.SPARSE_PRODUCT_EFFICIENCY["cpu"]
    for density, expected in [(0.02, "sparse"), (0.98, "complement"), (0.5, "dense"), (0.3, "dense")]:
        mask = random_mask(density, 7)
        nonzero = int(mask.sum())
        costs = {
            "dense": batch_size * DIM**2,
            "sparse": batch_size * nonzero / efficiency,
            "complement": batch_size * (DIM**2 - nonzero) / efficiency + batch_size * DIM,
        }
        entry = prepare_locality_mask(mask, SHAPE, batch_size)
        assert min(costs, key=costs.get) == expected
        assert entry.path == expected, (density, entry.costs)
        for name, cost in costs.items():
            assert entry.costs[name] == pytest.approx(cost)
        assert entry.path == min(entry.costs, key=entry.costs.get)  # tiles, when a candidate, lost here
    # break-even: a density just below / above the efficiency
    below, above = random_mask(0.8 * efficiency, 8), random_mask(1.2 * efficiency, 9)
    assert prepare_locality_mask(below, SHAPE, batch_size, paths=("dense", "sparse")).path == "sparse"
    assert prepare_locality_mask(above, SHAPE, batch_size, paths=("dense", "sparse")).path == "dense"


def test_cost_model_special_cases(monkeypatch):
    ones = torch.ones(DIM, DIM, dtype=torch.bool)
    assert prepare_locality_mask(ones, SHAPE).path == "ones"
    soft = torch.rand(DIM, DIM, generator=torch.Generator().manual_seed(3)) * (random_mask(0.02, 3))
    entry = prepare_locality_mask(soft, SHAPE)  # a soft mask stays dense, however sparse
    assert entry.path == "dense" and entry.sparse is None
    # a device type without a measured sparse rate: no sparse product
    monkeypatch.setattr(pca_mask, "SPARSE_PRODUCT_EFFICIENCY", {})
    entry = prepare_locality_mask(random_mask(0.02, 4), SHAPE, paths=("dense", "sparse", "complement"))
    assert entry.path == "dense" and set(entry.costs) == {"dense"}
