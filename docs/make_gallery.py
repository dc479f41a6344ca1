"""Regenerates the README's pictures: `docs/gallery.png`, a row of samples per method on the built-in digits (8x8),
faces (25x25) and 32x32 natural-image patches, and `docs/gallery_trajectory.png`, x_t and x0_hat at every step of
one ELS sample on the faces.

    python docs/make_gallery.py [--output-dir docs] [--num-samples 6] [--steps 20] [--seed 0]

CPU only, a few minutes on 2 cores. Every method is fitted with its `from_dataset` defaults (what a user gets without
choosing settings; the patch machines pick their patch-size schedule from the image size), except `SETTINGS` below,
which keep the run short. Sample i of every row starts from the same noise, seeded from `(seed, i)`, and runs
`steps` DDIM steps.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

import diffusers_analytic as da
from diffusers_analytic.registry import get_denoiser_class
from diffusers_analytic.utils.seeding import generators_for_indices

METHODS = ("wiener", "optimal", "scfdm", "nearest_dataset", "pca_locality", "ls", "els")
# (name shown, loader, nearest-neighbour scale of each tile)
DATA = {
    "digits 8x8": (lambda: da.load_builtin("digits"), 8),
    "faces 25x25": (lambda: da.load_builtin("faces"), 3),
    "patches 32x32": (lambda: da.load_builtin("patches", size=32, num_images=2000, seed=0, channels=3), 2),
}
# Where a method is slow on 2 cores, fit on the first N images only: ELS computes B H W x N H W patch logits per step,
# LS and PCA locality a per-pixel posterior over every image (PCA: D x D masks).
SETTINGS = {
    ("pca_locality", "patches 32x32"): {"num_images": 500},
    ("ls", "patches 32x32"): {"num_images": 500},
    ("els", "patches 32x32"): {"num_images": 100},
}
GAP, LABEL_WIDTH, HEADER = 2, 150, 28


def font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has a single bitmap font
        return ImageFont.load_default()


def to_tiles(images: np.ndarray, scale: int) -> list[Image.Image]:
    """`[B, H, W, C]` in [0, 1] -> PIL tiles enlarged `scale` times with nearest-neighbour."""
    pixels = (np.clip(images, 0, 1) * 255).round().astype(np.uint8)
    tiles = [Image.fromarray(p[..., 0] if p.shape[-1] == 1 else p).convert("RGB") for p in pixels]
    return [t.resize((t.width * scale, t.height * scale), Image.Resampling.NEAREST) for t in tiles]


def strip(tiles: list[Image.Image]) -> Image.Image:
    """Tiles side by side with a white gap."""
    width = sum(t.width for t in tiles) + GAP * (len(tiles) - 1)
    out = Image.new("RGB", (width, tiles[0].height), "white")
    for i, tile in enumerate(tiles):
        out.paste(tile, (i * (tile.width + GAP), 0))
    return out


def sample(denoiser, num_samples: int, steps: int, seed: int, **call) -> da.AnalyticDDIMPipeline:
    pipe = da.AnalyticDDIMPipeline(unet=denoiser)
    pipe.set_progress_bar_config(disable=True)
    return pipe(
        batch_size=num_samples,
        num_inference_steps=steps,
        generator=generators_for_indices(seed, range(num_samples)),
        output_type="np",
        **call,
    )


def fit(method: str, data_name: str, images: torch.Tensor):
    options = dict(SETTINGS.get((method, data_name), {}))
    count = options.pop("num_images", len(images))
    cls = get_denoiser_class(method)
    keywords = {"show_progress": False} if method in ("wiener", "pca_locality") else {}
    return cls.from_dataset(images[:count], **keywords, **options), count


def gallery(args) -> Image.Image:
    columns = []  # one column of rows per data set
    for data_name, (load, scale) in DATA.items():
        images = load().images
        rows = []
        for method in METHODS:
            start = time.perf_counter()
            denoiser, count = fit(method, data_name, images)
            out = sample(denoiser, args.num_samples, args.steps, args.seed)
            rows.append((method, count, strip(to_tiles(out.images, scale))))
            print(f"{data_name:14s} {method:16s} N={count:5d} {time.perf_counter() - start:6.1f} s", flush=True)
        columns.append((f"{data_name}, N = {len(images)}", len(images), rows))

    row_heights = [max(rows[r][2].height for _, _, rows in columns) for r in range(len(METHODS))]
    widths = [max(row[2].width for row in rows) + 40 for _, _, rows in columns]  # room for an "N=" note
    canvas = Image.new(
        "RGB",
        (LABEL_WIDTH + sum(w + 4 * GAP for w in widths), HEADER + sum(h + 4 * GAP for h in row_heights)),
        "white",
    )
    draw = ImageDraw.Draw(canvas)
    x = LABEL_WIDTH
    for (title, total, rows), width in zip(columns, widths):
        draw.text((x, 6), title, fill="black", font=font(16))
        y = HEADER
        for (_, count, row), height in zip(rows, row_heights):
            canvas.paste(row, (x, y))
            if count != total:
                draw.text((x + row.width + GAP, y), f"N={count}", fill="gray", font=font(11))
            y += height + 4 * GAP
        x += width + 4 * GAP
    y = HEADER
    for method, height in zip(METHODS, row_heights):
        draw.text((6, y + height // 2 - 9), method, fill="black", font=font(16))
        y += height + 4 * GAP
    return canvas


def trajectory(args) -> Image.Image:
    """x_t (top) and x0_hat (bottom) at every step of one ELS sample on the faces (defaults of `from_dataset`)."""
    faces = da.load_builtin("faces").images
    els = da.EquivariantLocalScoreDenoiser.from_dataset(faces)
    out = sample(els, 1, args.steps, args.seed, return_intermediates=True)
    to_image = lambda x: ((x[0].permute(1, 2, 0).numpy() + 1) / 2)[None]  # noqa: E731  [-1, 1] -> [1, H, W, C]
    scale = 3
    xt = strip([to_tiles(to_image(x), scale)[0] for x in out.trajectory_xt])
    x0 = strip([to_tiles(to_image(x), scale)[0] for x in out.trajectory_x0])
    canvas = Image.new("RGB", (LABEL_WIDTH + xt.width, HEADER + 2 * xt.height + 4 * GAP), "white")
    draw = ImageDraw.Draw(canvas)
    tile = xt.height + GAP
    for i, t in enumerate(out.timesteps):
        draw.text((LABEL_WIDTH + i * tile + 2, 8), f"t={int(t)}", fill="black", font=font(11))
    canvas.paste(xt, (LABEL_WIDTH, HEADER))
    canvas.paste(x0, (LABEL_WIDTH, HEADER + xt.height + 4 * GAP))
    draw.text((6, HEADER + xt.height // 2 - 9), "ELS: x_t", fill="black", font=font(16))
    draw.text((6, HEADER + xt.height + 4 * GAP + xt.height // 2 - 9), "x0_hat", fill="black", font=font(16))
    return canvas


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--output-dir", default=os.path.dirname(os.path.abspath(__file__)))
    parser.add_argument("--num-samples", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    os.makedirs(args.output_dir, exist_ok=True)
    gallery(args).save(os.path.join(args.output_dir, "gallery.png"), optimize=True)
    trajectory(args).save(os.path.join(args.output_dir, "gallery_trajectory.png"), optimize=True)


if __name__ == "__main__":
    main()
