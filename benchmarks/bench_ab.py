"""A/B timings in one process, the two variants alternating, so that a shared machine's drift hits both alike.

    python benchmarks/bench_ab.py revision --base REV [--methods optimal nearest_dataset wiener pca_locality]
    python benchmarks/bench_ab.py pca-dense      # PCA locality: one-GEMM dense path vs the tiled dense path

`revision` times `denoise` of the working tree against the package as it was at git revision REV (extracted with
`git archive` into a temporary folder and imported under another name, so both live in one process), on the same
inputs: 32x32x3 patches, N = 10000 (2000 for PCA locality), batch 8, 16 and 64, noisy training images at
t = 999, 500 and 100. It prints the best of `--repeats` calls per variant and round, their ratio, and the relative
difference of the two results.
`pca-dense` times a PCA-locality step (N = 2000, B = 8, threshold 0.02, mask cached) with the dense formulation as
one GEMM for all pixels and, forced, as the 512-pixel tiles that the sparse tilings use, and reports both results'
relative difference.
"""

from __future__ import annotations

import argparse
import importlib
import io
import os
import subprocess
import sys
import tarfile
import tempfile
from functools import partial

import torch
from timing import best_time

import diffusers_analytic as da
from diffusers_analytic.models import pca_mask

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CLASSES = {
    "optimal": "OptimalDenoiser",
    "nearest_dataset": "NearestDatasetDenoiser",
    "wiener": "WienerDenoiser",
    "pca_locality": "PCALocalityDenoiser",
}


def import_revision(revision: str, folder: str):
    """The package `src/diffusers_analytic` at `revision`, imported as `diffusers_analytic_base` (relative imports)."""
    archive = subprocess.run(
        ["git", "-C", ROOT, "archive", revision, "src/diffusers_analytic"], check=True, capture_output=True
    ).stdout
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    os.rename(os.path.join(folder, "src", "diffusers_analytic"), os.path.join(folder, "diffusers_analytic_base"))
    sys.path.insert(0, folder)
    return importlib.import_module("diffusers_analytic_base")


def ab_revision(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = import_revision(args.base, folder)
        print(
            f"{torch.get_num_threads()} threads; ms per call (best of {args.repeats}), base {args.base} / working tree"
        )
        for method in args.methods:
            num_images = args.num_images or (2000 if method == "pca_locality" else 10000)
            patches = da.load_builtin("patches", size=32, num_images=num_images).images
            storages = ("uint8", "float32") if method == "optimal" else (None,)
            for storage in storages:
                kwargs = {"show_progress": False} | ({"storage_dtype": storage} if storage else {})
                ours = getattr(da, CLASSES[method]).from_dataset(patches, **kwargs)
                theirs = getattr(base, CLASSES[method]).from_dataset(patches, **kwargs)
                batch_sizes = [8] if method == "pca_locality" else args.batch_sizes
                for batch_size in batch_sizes:
                    for timestep in (999, 500, 100):
                        generator = torch.Generator().manual_seed(timestep)
                        a = float(ours.alphas_cumprod[timestep])
                        index = torch.randint(0, num_images, (batch_size,), generator=generator)
                        y = patches[index].float() / 127.5 - 1.0
                        x = a**0.5 * y + (1 - a) ** 0.5 * torch.randn(y.shape, generator=generator)
                        repeats = 1 if method == "pca_locality" else args.repeats
                        base_times, our_times = [], []
                        for _ in range(args.rounds):
                            base_times.append(1e3 * best_time(partial(theirs.denoise, x, timestep), repeats))
                            our_times.append(1e3 * best_time(partial(ours.denoise, x, timestep), repeats))
                        reference = theirs.denoise(x, timestep)
                        difference = float((ours.denoise(x, timestep) - reference).norm() / reference.norm())
                        name = f"{method} {storage or ''}".strip()
                        print(
                            f"{name:>16} B = {batch_size:>2} t = {timestep:>3}: {min(base_times):8.1f} / "
                            f"{min(our_times):8.1f}  ratio {min(our_times) / min(base_times):.2f}  "
                            f"relative difference {difference:.1e}",
                            flush=True,
                        )


def ab_pca_dense(args) -> None:
    num_images = args.num_images or 2000
    patches = da.load_builtin("patches", size=32, num_images=num_images)
    denoiser = da.PCALocalityDenoiser.from_dataset(patches, show_progress=False, mask_threshold=0.02)
    x = torch.randn(8, 3 * 32 * 32, generator=torch.Generator().manual_seed(0))
    print(f"N = {num_images}, B = 8; s per step (mask cached), one GEMM / tiled, per round")
    for timestep in (500, 100):
        a = float(denoiser.alphas_cumprod[timestep])
        cached = denoiser.locality_mask(a, 8)
        tiles = pca_mask.locality_tiles(cached.mask, denoiser.sample_shape, batch_size=8)
        variants = {  # the same mask, evaluated as one GEMM or forced onto its tiles
            "one GEMM": pca_mask.LocalityMask(cached.mask, tiles, cached.nonzero_fraction, path="dense"),
            "tiled": pca_mask.LocalityMask(cached.mask, tiles, cached.nonzero_fraction, path="tiles"),
        }
        rounds, outputs = [], {}
        for _ in range(args.rounds):
            row = []
            for name, mask in variants.items():
                step = partial(denoiser._denoise_group, x, a, 1.0 - a, mask=mask)
                row.append(best_time(step, 1))
                outputs[name] = step()
            rounds.append(f"{row[0]:.2f} / {row[1]:.2f}")
        difference = float((outputs["one GEMM"] - outputs["tiled"]).norm() / outputs["tiled"].norm())
        print(f"t = {timestep}: " + ", ".join(rounds) + f"; relative difference {difference:.1e}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("what", choices=["revision", "pca-dense"])
    parser.add_argument("--base", default="HEAD", help="git revision to compare the working tree with (revision)")
    parser.add_argument("--methods", nargs="+", default=list(CLASSES), choices=list(CLASSES))
    parser.add_argument("--num-images", type=int, default=None, help="default: 10000 (2000 for PCA locality)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[8, 16, 64])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    if args.what == "revision":
        ab_revision(args)
    else:
        ab_pca_dense(args)


if __name__ == "__main__":
    main()
