"""Stated machine rates for the estimates logged before long work. They are round figures to size a run, not
measurements (benchmarks/ measures the machine it runs on)."""

from __future__ import annotations

#: Float32 GEMM rate of a few CPU cores, and of a data-center GPU (TF32 matmuls), in flop/s.
CPU_FLOPS, GPU_FLOPS = 1e11, 5e13
#: Float64 rate of a few CPU cores (the fit's moments and eigendecomposition run in float64).
CPU_FLOPS_FLOAT64 = 5e10
#: Work above which a sampling run announces itself: about 10 minutes at `CPU_FLOPS`.
LONG_RUN_FLOPS = 6e13
#: Float64 work above which a fit announces its eigendecomposition: about a minute at `CPU_FLOPS_FLOAT64`.
LONG_FIT_FLOPS = 3e12


def eigh_flops(size: int) -> float:
    """Flops of a symmetric eigendecomposition with vectors of a `size` x `size` matrix, about 9 n^3."""
    return 9.0 * float(size) ** 3


def time_at_stated_rates(flops: float) -> str:
    """`about X min at 100 GFLOP/s (a few CPU cores), Y s at 50 TFLOP/s (a data-center GPU)` for float32 work."""
    return (
        f"about {flops / CPU_FLOPS / 60:.3g} min at {CPU_FLOPS / 1e9:.0f} GFLOP/s (a few CPU cores), "
        f"{flops / GPU_FLOPS:.3g} s at {GPU_FLOPS / 1e12:.0f} TFLOP/s (a data-center GPU)"
    )
