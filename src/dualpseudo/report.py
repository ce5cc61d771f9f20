"""Pictures and the run report: sample grids, training curves, confusion matrices, report.html and report.md."""
from __future__ import annotations

import io
from pathlib import Path

import numpy as np

from .artifacts import atomic_write


def grid_image(images: np.ndarray, rows: int, row_names: list[str] | None = None, scale: int = 2):
    """A PIL image of uint8 `images` (N, H, W, C) laid out in `rows` rows, with class names on the left."""
    from PIL import Image, ImageDraw

    n, h, w, c = images.shape
    cols = -(-n // rows)
    label_w = 90 if row_names else 0
    pad = 2
    canvas = Image.new("RGB", (label_w + cols * (w * scale + pad) + pad, rows * (h * scale + pad) + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for i in range(n):
        r, k = divmod(i, cols)
        tile = images[i][..., 0] if c == 1 else images[i]
        im = Image.fromarray(tile, "L" if c == 1 else "RGB").convert("RGB").resize((w * scale, h * scale), Image.NEAREST)
        canvas.paste(im, (label_w + pad + k * (w * scale + pad), pad + r * (h * scale + pad)))
    for r, name in enumerate(row_names or []):
        draw.text((4, pad + r * (h * scale + pad) + h * scale // 2 - 6), str(name)[:14], fill="black")
    return canvas


def save_grid(path: str | Path, images: np.ndarray, rows: int, row_names: list[str] | None = None) -> Path:
    """Write a PNG grid (one row per class when images are ordered class by class)."""
    img = grid_image(images, rows, row_names)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return atomic_write(path, lambda f: f.write(buf.getvalue()))
