"""Stated machine rates for the estimates logged before long work. They are round figures to size a run, not
measurements (benchmarks/ measures the machine it runs on)."""

from __future__ import annotations

#: Float32 GEMM rate of a few CPU cores, and of a data-center GPU (TF32 matmuls), in flop/s.
CPU_FLOPS, GPU_FLOPS = 1e11, 5e13
#: Float64 rate of a few CPU cores (the fit's moments run in float64 GEMMs).
CPU_FLOPS_FLOAT64 = 5e10
#: Effective rate of a float64 symmetric eigendecomposition of a large matrix on a few CPU cores (9 n^3 / time): half
#: of its work is matrix-vector products that stream the matrix from memory, well below the GEMM rate.
CPU_EIGH_FLOPS = 2e10
#: Work above which a sampling run announces itself: about 10 minutes at `CPU_FLOPS`.
LONG_RUN_FLOPS = 6e13
#: A fit announces a float64 step (moments, eigendecomposition) estimated at more than this many seconds.
LONG_FIT_SECONDS = 60.0


def eigh_flops(size: int) -> float:
    """Flops of a symmetric eigendecomposition with vectors of a `size` x `size` matrix, about 9 n^3."""
    return 9.0 * float(size) ** 3


def time_at_stated_rates(flops: float, rate_fraction: float = 1.0) -> str:
    """
    `about X min at 100 GFLOP/s (a few CPU cores), Y s at 50 TFLOP/s (a data-center GPU)` for float32 work that runs
    at `rate_fraction` of the GEMM rate (a method's `gemm_rate_fraction`).
    """
    cpu, gpu = CPU_FLOPS * rate_fraction, GPU_FLOPS * rate_fraction
    share = "" if rate_fraction == 1.0 else f" ({rate_fraction:.0%} of the GEMM rate: elementwise work)"
    return (
        f"about {flops / cpu / 60:.3g} min at {cpu / 1e9:.3g} GFLOP/s (a few CPU cores), {flops / gpu:.3g} s at "
        f"{gpu / 1e12:.3g} TFLOP/s (a data-center GPU){share}"
    )
