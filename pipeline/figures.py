"""Pictures of an evaluation, drawn with Pillow: a confusion heatmap, an overlay preview and
curves over IoU thresholds (instance matching).

The preview shows, side by side and downsampled to at most ~1000 px: the image with the
ground truth in class colours, the image with the prediction, and the errors (red where
prediction and truth differ, grey where pixels were ignored). It is there so a person can
look at what happened, not only read numbers.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageDraw, ImageFont

# Distinct, colour-blind-aware class colours (Okabe-Ito, then Tableau), as RGB.
DEFAULT_COLOURS = [
    (0, 114, 178), (230, 159, 0), (0, 158, 115), (204, 121, 167), (86, 180, 233),
    (213, 94, 0), (240, 228, 66), (0, 0, 0), (148, 103, 189), (140, 86, 75),
    (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip


def class_colours(num_classes: int, palette: tuple[tuple[int, int, int], ...] = ()) -> np.ndarray:
    if len(palette) >= num_classes:
        return np.array(palette[:num_classes], dtype=np.uint8)
    reps = -(-num_classes // len(DEFAULT_COLOURS))
    return np.array((DEFAULT_COLOURS * reps)[:num_classes], dtype=np.uint8)


def confusion_heatmap(cm: np.ndarray, names: list[str], title: str = "") -> bytes:
    """Row-normalised confusion matrix (recall per true class), with counts, as PNG bytes."""
    k = cm.shape[0]
    cell, font = max(48, min(96, 640 // max(k, 1))), _font(13)
    margin_left = 24 + max(_text_width(font, n) for n in names)
    margin_top = 70
    title = title or "confusion matrix (rows: ground truth, columns: prediction)"
    width = max(margin_left + k * cell + 20, _text_width(font, title) + 24)
    height = margin_top + k * cell + 40
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    rows = cm.sum(axis=1, keepdims=True)
    frac = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    for i in range(k):
        for j in range(k):
            shade = int(255 - 200 * frac[i, j])
            x, y = margin_left + j * cell, margin_top + i * cell
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=(shade, shade, 255), outline=(200, 200, 200))
            colour = "white" if frac[i, j] > 0.55 else "black"
            draw.text((x + 4, y + 4), f"{100 * frac[i, j]:.1f}%", fill=colour, font=font)
            draw.text((x + 4, y + 22), _short(int(cm[i, j])), fill=colour, font=_font(10))
    for i, name in enumerate(names):
        y = margin_top + i * cell + cell // 2 - 7
        draw.text((margin_left - 8 - _text_width(font, name), y), name, fill="black", font=font)
        draw.text((margin_left + i * cell + 4, margin_top - 20), name[: max(3, cell // 8)], fill="black", font=font)
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((8, 28), "cells: share of the true class's pixels, and their count", fill=(90, 90, 90), font=_font(11))
    return _png(img)


def overlay_preview(
    image: np.ndarray,
    truth: np.ndarray,
    pred: np.ndarray,
    colours: np.ndarray,
    ignored: np.ndarray | None = None,
) -> bytes:
    """Three panels: image + truth, image + prediction, errors, as PNG bytes. ``image`` is (C, h, w)."""
    base = _display(image)
    alpha = 0.45
    panels = []
    for ids in (truth, pred):
        coloured = colours[np.clip(ids, 0, len(colours) - 1)].astype(np.float32)
        panels.append((1 - alpha) * base + alpha * coloured)
    errors = base * 0.35 + 255 * 0.65
    wrong = truth != pred
    errors[wrong] = (220, 30, 30)
    if ignored is not None:
        errors[ignored] = (160, 160, 160)
        for panel in panels:
            panel[ignored] = base[ignored]
    panels.append(errors)
    h, w = truth.shape
    font = _font(14)
    gap, head = 8, 26
    canvas = Image.new("RGB", (3 * w + 2 * gap, h + head), "white")
    draw = ImageDraw.Draw(canvas)
    for n, (panel, label) in enumerate(zip(panels, ("ground truth", "prediction", "errors (red)"))):
        canvas.paste(Image.fromarray(np.clip(panel, 0, 255).astype(np.uint8)), (n * (w + gap), head))
        draw.text((n * (w + gap) + 4, 4), label, fill="black", font=font)
    return _png(canvas)


def threshold_curves(thresholds: list[float], curves: dict[str, list[float]], title: str) -> bytes:
    """Curves over IoU thresholds (x) with values 0..1 (y), e.g. precision, recall, F1, as PNG."""
    width, height, left, top, right, bottom = 640, 400, 60, 50, 150, 50
    img = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(img)
    font, small = _font(13), _font(11)
    x0, x1, y0, y1 = left, width - right, height - bottom, top
    lo, hi = min(thresholds), max(thresholds)

    def at(t: float, v: float) -> tuple[float, float]:
        return x0 + (t - lo) / ((hi - lo) or 1) * (x1 - x0), y0 - v * (y0 - y1)

    for k in range(6):
        v = k / 5
        _, y = at(lo, v)
        draw.line([x0, y, x1, y], fill=(225, 225, 225))
        draw.text((x0 - 34, y - 7), f"{v:.1f}", fill="black", font=small)
    for t in thresholds[:: max(1, len(thresholds) // 5)]:
        x, _ = at(t, 0)
        draw.line([x, y0, x, y0 + 4], fill="black")
        draw.text((x - 12, y0 + 8), f"{t:.2f}", fill="black", font=small)
    draw.rectangle([x0, y1, x1, y0], outline="black")
    for i, (name, values) in enumerate(curves.items()):
        colour = DEFAULT_COLOURS[i % len(DEFAULT_COLOURS)]
        points = [at(t, v) for t, v in zip(thresholds, values) if v == v]  # NaN: not drawn
        if len(points) > 1:
            draw.line(points, fill=colour, width=2)
        for x, y in points:
            draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colour)
        draw.line([x1 + 14, y1 + 10 + 20 * i, x1 + 34, y1 + 10 + 20 * i], fill=colour, width=3)
        draw.text((x1 + 40, y1 + 3 + 20 * i), name, fill="black", font=font)
    draw.text((8, 8), title, fill="black", font=font)
    draw.text((x0 + (x1 - x0) // 2 - 60, height - 22), "IoU threshold", fill="black", font=font)
    return _png(img)


def _png(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, format="PNG")
    return buffer.getvalue()


def _display(image: np.ndarray) -> np.ndarray:
    """(C, h, w) -> (h, w, 3) float in 0..255, contrast-stretched by the 1/99 percentiles."""
    x = image.astype(np.float32)
    x = x[:3] if x.shape[0] >= 3 else np.repeat(x[:1], 3, axis=0)
    lo, hi = np.percentile(x, [1, 99])
    x = np.clip((x - lo) / (hi - lo if hi > lo else 1.0), 0, 1) * 255
    return np.moveaxis(x, 0, -1)


def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow without FreeType sizes
        return ImageFont.load_default()


def _text_width(font: ImageFont.ImageFont | ImageFont.FreeTypeFont, text: str) -> int:
    box = ImageDraw.Draw(Image.new("RGB", (1, 1))).textbbox((0, 0), text, font=font)
    return int(box[2] - box[0])


def _short(n: int) -> str:
    for unit, size in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)
