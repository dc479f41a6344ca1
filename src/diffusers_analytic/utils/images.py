"""The one sample grid of the package (`generate`'s grid.png, `build`'s samples.png): small images enlarged with
nearest-neighbour so their pixels stay sharp, and a gap between the tiles so that neighbours do not merge.

A leaf: it imports only PIL.
"""

from __future__ import annotations

import math

from PIL import Image


def image_grid(
    images: list[Image.Image],
    cols: int | None = None,
    min_width: int = 256,
    gap: int = 2,
    background: str = "white",
) -> Image.Image:
    """
    Tiles `images` (all of one size) row by row, `cols` per row (default: the ceiling of the square root), each
    enlarged by the same integer factor with nearest-neighbour, the smallest that makes the grid at least `min_width`
    pixels wide; `gap` pixels of `background` between tiles. Missing tiles of the last row stay background.
    """
    if not images:
        raise ValueError("A grid needs at least one image.")
    if cols is not None and cols < 1:
        raise ValueError(f"`cols` must be a positive integer, got {cols}.")
    cols = min(cols or math.ceil(math.sqrt(len(images))), len(images))
    rows = math.ceil(len(images) / cols)
    width, height = images[0].size
    scale = max(1, math.ceil((min_width - gap * (cols - 1)) / (cols * width)))
    tile_width, tile_height = width * scale, height * scale
    mode = images[0].mode
    grid = Image.new(mode, (cols * tile_width + gap * (cols - 1), rows * tile_height + gap * (rows - 1)), background)
    for position, image in enumerate(images):
        if image.size != (width, height):
            raise ValueError(f"All images of a grid must have one size; got {(width, height)} and {image.size}.")
        row, col = divmod(position, cols)
        tile = image.convert(mode).resize((tile_width, tile_height), Image.Resampling.NEAREST)
        grid.paste(tile, (col * (tile_width + gap), row * (tile_height + gap)))
    return grid
