"""Pictures: sample grids (PIL) and the report's plots (matplotlib Figure objects, no pyplot state) as PNG bytes."""
from __future__ import annotations

import io
import math
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


def as_number(x) -> float | None:
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight")
    return buf.getvalue()


def curves_png(rows: list[dict], title: str) -> bytes | None:
    """One small panel per numeric key of `rows`, against `step` (classifier) or `kimg` (diffusion)."""
    from matplotlib.figure import Figure

    xkey = "step" if any("step" in r for r in rows) else "kimg" if any("kimg" in r for r in rows) else None
    keys = [k for k in dict.fromkeys(k for r in rows for k in r)
            if k not in (xkey, "time") and any(as_number(r.get(k)) is not None for r in rows)]
    if not keys:
        return None
    x = np.array([as_number(r.get(xkey)) if xkey else i for i, r in enumerate(rows)], dtype=float)
    cols = min(4, len(keys))
    nrows = -(-len(keys) // cols)
    fig = Figure(figsize=(3.2 * cols, 2.4 * nrows), layout="constrained")
    axes = np.atleast_1d(fig.subplots(nrows, cols, squeeze=False)).reshape(-1)
    for ax, k in zip(axes, keys):
        y = np.array([np.nan if as_number(r.get(k)) is None else r[k] for r in rows], dtype=float)
        ok = np.isfinite(x) & np.isfinite(y)
        ax.plot(x[ok], y[ok], lw=1.2, marker="." if ok.sum() < 30 else None)
        if k.startswith("loss") and ok.any() and (y[ok] > 0).all() and y[ok].max() > 10 * y[ok].min():
            ax.set_yscale("log")
        ax.set_title(k, fontsize=10)
        ax.set_xlabel(xkey or "log line", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    for ax in axes[len(keys):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=11)
    return png_bytes(fig)


def bars_png(series: dict[str, list], names: list[str], title: str) -> bytes:
    """Grouped bars per class in [0, 1]; undefined values (None) are marked n/a."""
    from matplotlib.figure import Figure

    n = max([len(names)] + [len(v) for v in series.values()])
    labels = (names + [str(i) for i in range(len(names), n)])[:n]
    fig = Figure(figsize=(max(6.0, 0.7 * n + 2), 3.6), layout="constrained")
    ax = fig.subplots()
    width = 0.8 / max(1, len(series))
    for j, (name, vals) in enumerate(series.items()):
        xs = np.arange(n) + (j - (len(series) - 1) / 2) * width
        ys = [as_number(vals[i]) if i < len(vals) else None for i in range(n)]
        ax.bar(xs, [0 if y is None else y for y in ys], width, label=name)
        for xv, y in zip(xs, ys):
            if y is None:
                ax.text(xv, 0.02, "n/a", ha="center", va="bottom", rotation=90, fontsize=7)
    ax.set_xticks(np.arange(n), labels, rotation=30, ha="right", fontsize=9)
    ax.set_ylim(0, 1.2)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_title(title, fontsize=11)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", ncol=len(series))
    return png_bytes(fig)


def heatmap_png(cm, names: list[str], title: str) -> bytes | None:
    """Confusion matrix (rows true, columns predicted): colour = row-normalised share, text = count."""
    from matplotlib.figure import Figure

    try:
        m = np.asarray(cm, dtype=float)
    except (TypeError, ValueError):
        return None
    if m.ndim != 2 or m.shape[0] != m.shape[1] or m.shape[0] == 0:
        return None
    n = m.shape[0]
    labels = names if len(names) == n else [str(i) for i in range(n)]
    share = m / np.maximum(m.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.3 * n + 2.2)
    fig = Figure(figsize=(size + 0.8, size), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="share of true class")
    if n <= 20:
        for i in range(n):
            for j in range(n):
                ax.text(j, i, f"{m[i, j]:.0f}", ha="center", va="center", fontsize=6 if n > 10 else 7,
                        color="white" if share[i, j] > 0.5 else "black")
    ticks = np.arange(n) if n <= 40 else np.arange(0, n, max(1, n // 20))
    ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, [labels[t] for t in ticks], fontsize=8)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=10)
    return png_bytes(fig)


# -------------------------------------------------------------------------------------------------- rendering
