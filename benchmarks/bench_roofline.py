"""Wiener and exact optimal `denoise` calls against this machine's roofline, measured in the same run.

    python benchmarks/bench_roofline.py [--repeats 7] [--batch-sizes 8 64]

32x32x3 patches (D = 3072), N = 10000. The machine is measured in the same process, each row's calls alternating
with two probes, so that a shared machine's drift hits the call and its roofline alike:

- copy bandwidth: a 256 MiB float32 `Tensor.copy_`, (bytes read + bytes written) / time;
- GEMM rate: a square float32 matmul of side 2048, 2 n^3 flops / time.

Each row's roofline is max(bytes that must be read / copy bandwidth, flops / GEMM rate):

- Wiener: the D x D float32 basis is read at least once (4 D^2 bytes); 2 B D^2 multiply-adds (4 B D^2 flops);
- optimal (uint8 storage): the N x D stored bytes are read at least once (N D bytes); the logits and the weighted sum
  are 2 B N D multiply-adds (4 B N D flops).

The table gives the best of `--repeats` rounds for the call (inputs: noisy training images at t = 500) and each
probe, the roofline and their ratio (1.0 = at the machine's limit). On a shared machine run it twice: the ratio is
what to compare.
"""

from __future__ import annotations

import argparse

import torch
from timing import alternating_best

import diffusers_analytic as da


def copy_and_gemm_timers(mib: int = 256, size: int = 2048):
    """Two timed probes of the machine: a large float32 `copy_` and a square float32 matmul."""
    source = torch.rand(mib * 2**20 // 4)
    target = torch.empty_like(source)
    a, b = torch.rand(size, size), torch.rand(size, size)
    copy_bytes = 2 * source.numel() * 4  # read + written
    return (lambda: target.copy_(source)), copy_bytes, (lambda: a @ b), 2 * size**3


def noisy(images: torch.Tensor, batch_size: int, alpha: float) -> torch.Tensor:
    x0 = images[:batch_size].float() / 127.5 - 1
    noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    return alpha**0.5 * x0 + (1 - alpha) ** 0.5 * noise


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 64])
    parser.add_argument("--num-images", type=int, default=10000)
    args = parser.parse_args()

    copy, copy_bytes, gemm, gemm_flops = copy_and_gemm_timers()
    print(f"{torch.get_num_threads()} threads; best of {args.repeats} rounds, each row interleaved with the probes")
    images = da.load_builtin("patches", size=32, num_images=args.num_images).images
    count, dim = len(images), images[0].numel()
    wiener = da.WienerDenoiser.from_dataset(images, show_progress=False)
    optimal = da.OptimalDenoiser.from_dataset(images, storage_dtype="uint8", show_progress=False)
    alpha = float(wiener.alphas_cumprod[500])
    rows = []
    for batch_size in args.batch_sizes:
        x = noisy(images, batch_size, alpha)
        for name, model, needed_bytes, flops in (
            ("wiener", wiener, 4 * dim * dim, 4 * batch_size * dim * dim),
            ("optimal uint8", optimal, count * dim, 4 * batch_size * count * dim),
        ):
            best = alternating_best(
                {"call": lambda m=model, x=x: m.denoise(x, 500), "copy": copy, "gemm": gemm}, args.repeats
            )
            bandwidth, rate = copy_bytes / best["copy"], gemm_flops / best["gemm"]
            roofline = max(needed_bytes / bandwidth, flops / rate)
            bound = "memory" if needed_bytes / bandwidth >= flops / rate else "compute"
            rows.append((name, batch_size, best["call"], bandwidth, rate, roofline, bound))
    print(f"N = {count}, D = {dim}")
    print("| method | B | measured ms | copy GB/s | GEMM GFLOP/s | roofline ms | bound | measured / roofline |")
    print("|---|---|---|---|---|---|---|---|")
    for name, batch_size, seconds, bandwidth, rate, roofline, bound in rows:
        print(
            f"| {name} | {batch_size} | {seconds * 1e3:.2f} | {bandwidth / 1e9:.1f} | {rate / 1e9:.0f} | "
            f"{roofline * 1e3:.2f} | {bound} | {seconds / roofline:.2f} |"
        )


if __name__ == "__main__":
    main()
