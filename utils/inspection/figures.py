"""Figures drawn with Pillow: a confusion matrix, a grid of labelled predictions, an image beside
its attention rollout.

Each figure is an (H, W, 3) uint8 array, ready for TensorBoard's
``SummaryWriter.add_image(..., dataformats="HWC")`` (see ``log_eval_images``) or ``save_png``.
Every figure of the application is here (about 330 lines), because they share the font, text
fitting and colour helpers at the top.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from utils.inspection.rollout import jet, overlay_heatmap

WHITE, BLACK, GREY = (255, 255, 255), (20, 20, 20), (110, 110, 110)
GREEN, RED = (0, 140, 60), (210, 30, 30)
# A white-to-dark-blue ramp (the stops of matplotlib's "Blues"), for fractions 0, 0.5 and 1.
_BLUES = np.array([[247, 251, 255], [107, 174, 214], [8, 48, 107]], dtype=np.float64)


@functools.lru_cache(maxsize=8)
def _font(size: int) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    """Pillow's built-in font at ``size`` px (a fixed small bitmap font without FreeType)."""
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, ImportError, OSError):
        return ImageFont.load_default()


def _text_width(font, text: str) -> int:
    return math.ceil(font.getlength(text))


def _fit(font, text: str, width: int) -> str:
    """``text`` shortened with an ellipsis until it is at most ``width`` pixels wide."""
    if _text_width(font, text) <= width:
        return text
    while text and _text_width(font, text + "…") > width:
        text = text[:-1]
    return text + "…"


def _to_numpy(values) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        values = values.detach().cpu().numpy()
    return np.asarray(values)


def _blues(fraction: float) -> tuple[int, int, int]:
    x = min(max(fraction, 0.0), 1.0) * 2
    low = min(int(x), 1)
    colour = _BLUES[low] + (x - low) * (_BLUES[low + 1] - _BLUES[low])
    return tuple(int(round(c)) for c in colour)


def confusion_matrix_image(cm: np.ndarray, class_names: Sequence[str]) -> np.ndarray:
    """The matrix as a picture: rows true classes, columns predictions, cells shaded by the
    fraction of their row. Up to 30 classes each cell shows its count and each row its recall; with
    more (CIFAR-100) the cells are small squares and only every tenth index is marked.

    The layout is measured, not fixed: the figure is at least as wide as its title, whole (the
    matrix centred below it when narrower: 2 or 3 classes), and the title, the "recall" heading
    and the grid each have rows of their own.
    """
    cm = _to_numpy(cm).astype(np.int64)
    k = cm.shape[0]
    if cm.shape != (k, k) or len(class_names) != k:
        raise ValueError(f"a {cm.shape} matrix for {len(class_names)} class names")
    labelled = k <= 30
    font, small = _font(13), _font(11)
    total, correct = int(cm.sum()), int(np.trace(cm))
    accuracy = correct / total if total else float("nan")
    title = f"Confusion matrix: {total} images, accuracy {accuracy:.4f}"
    pad = 8

    cell = 40 if labelled else max(6, 600 // k)
    names = [str(n) for n in class_names] if labelled else [str(i) for i in range(k)]
    name_width = max(_text_width(small, n) for n in names) + 8
    grid = cell * k
    right = 64 if labelled else 16  # the recall column
    content = 24 + name_width + grid + right  # "true" axis title, row names, grid, recall
    width = max(content, _text_width(font, title) + 2 * pad)
    left = (width - content) // 2 + 24 + name_width
    title_bottom = pad + font.getbbox(title)[3]
    heading = -small.getbbox("recall", anchor="lb")[1] + 4 if labelled else 0  # "recall" row
    top = title_bottom + 6 + heading
    bottom = (name_width if labelled else 16) + 26  # column names, the "predicted" axis title
    height = top + grid + bottom
    image = Image.new("RGB", (width, height), WHITE)
    draw = ImageDraw.Draw(image)
    draw.text((pad, pad), title, fill=BLACK, font=font)

    rows = cm.sum(axis=1, keepdims=True)
    fractions = cm / np.maximum(rows, 1)
    for t in range(k):
        for p in range(k):
            x0, y0 = left + p * cell, top + t * cell
            shade = _blues(float(fractions[t, p]))
            draw.rectangle((x0, y0, x0 + cell - 1, y0 + cell - 1), fill=shade)
            if labelled and cm[t, p]:
                text = str(cm[t, p])
                ink = WHITE if fractions[t, p] > 0.5 else BLACK
                draw.text((x0 + cell / 2, y0 + cell / 2), text, fill=ink, font=small, anchor="mm")
    # Thin lines between the cells that carry numbers, and a frame.
    for i in range(1, k if labelled else 1):
        draw.line((left + i * cell, top, left + i * cell, top + grid - 1), fill=(225, 225, 225))
        draw.line((left, top + i * cell, left + grid - 1, top + i * cell), fill=(225, 225, 225))
    draw.rectangle((left - 1, top - 1, left + grid, top + grid), outline=GREY)

    marks = range(k) if labelled else range(0, k, 10)
    for i in marks:
        x, y = left + i * cell + cell / 2, top + i * cell + cell / 2  # centre of column / row i
        draw.text((left - 4, y), names[i], fill=BLACK, font=small, anchor="rm")
        if not labelled:  # just the index under its column
            draw.text((x, top + grid + 4), names[i], fill=BLACK, font=small, anchor="mt")
            continue
        if rows[i, 0]:
            recall = cm[i, i] / rows[i, 0]
            draw.text((left + grid + 6, y), f"{recall:.2f}", fill=GREY, font=small, anchor="lm")
        # Column names, written sideways: draw on a strip, rotate it, paste below the grid.
        strip = Image.new("RGB", (name_width, cell), WHITE)
        ImageDraw.Draw(strip).text(
            (name_width - 4, cell / 2), names[i], fill=BLACK, font=small, anchor="rm"
        )
        image.paste(strip.rotate(90, expand=True), (left + i * cell, top + grid + 2))
    if labelled:
        draw.text((left + grid + 6, top - 4), "recall", fill=GREY, font=small, anchor="lb")
    draw.text((left + grid / 2, height - 6), "predicted", fill=BLACK, font=font, anchor="md")
    axis = Image.new("RGB", (grid, 18), WHITE)
    ImageDraw.Draw(axis).text((grid / 2, 9), "true", fill=BLACK, font=font, anchor="mm")
    image.paste(axis.rotate(90, expand=True), (left - name_width - 20, top))
    return np.asarray(image)


def _tile(image: torch.Tensor, size: int) -> Image.Image:
    """A normalised (3, H, W) image in [-1, 1] as a ``size``-px square picture."""
    pixels = ((image.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte()
    picture = Image.fromarray(pixels.permute(1, 2, 0).numpy())
    # Small inputs (CIFAR's 32 px) are enlarged in crisp blocks; large ones shrunk smoothly.
    upscale = picture.width <= size and size % picture.width == 0
    return picture.resize((size, size), Image.NEAREST if upscale else Image.LANCZOS)


def prediction_grid(
    images: torch.Tensor,
    preds,
    labels,
    class_names: Sequence[str],
    max_images: int = 16,
) -> np.ndarray:
    """Up to ``max_images`` test images in a grid, each framed and captioned with its predicted
    class (green when right, red when wrong) above its true class."""
    preds, labels = _to_numpy(preds).ravel(), _to_numpy(labels).ravel()
    n = min(len(images), len(preds), len(labels), max_images)
    if n == 0:
        raise ValueError("no images to draw")
    font = _font(12)
    size, pad, caption = 96, 10, 36
    cols = math.ceil(math.sqrt(n))
    rows = math.ceil(n / cols)
    tile_w, tile_h = size + 2 * pad, size + caption + 2 * pad
    grid = Image.new("RGB", (cols * tile_w, rows * tile_h), WHITE)
    draw = ImageDraw.Draw(grid)
    for i in range(n):
        x, y = (i % cols) * tile_w + pad, (i // cols) * tile_h + pad
        pred, label = int(preds[i]), int(labels[i])
        colour = GREEN if pred == label else RED
        draw.rectangle((x - 3, y - 3, x + size + 2, y + size + 2), fill=colour)
        grid.paste(_tile(images[i], size), (x, y))
        draw.text(
            (x, y + size + 5), _fit(font, f"pred: {class_names[pred]}", size + pad),
            fill=colour, font=font,
        )  # fmt: skip
        draw.text(
            (x, y + size + 20), _fit(font, f"true: {class_names[label]}", size + pad),
            fill=GREY, font=font,
        )  # fmt: skip
    return np.asarray(grid)


# The panels of an attention figure: at least this many pixels on the short side (a CIFAR image is
# enlarged 12 times), a large photo shrunk to the upper bound, and no panel longer than the last.
MIN_SHORT_SIDE, MAX_SHORT_SIDE, MAX_LONG_SIDE = 384, 512, 2048


def enlarge(image: Image.Image) -> tuple[Image.Image, str]:
    """``image`` at the size a figure shows it, and a note saying how it was scaled.

    A small image is enlarged by the smallest whole factor that brings its short side to
    ``MIN_SHORT_SIDE``, nearest-neighbour: every pixel becomes a square block of one colour, so
    what the model saw is shown as it is, not smoothed. (A panorama stops at ``MAX_LONG_SIDE``.)
    A photo whose short side passes ``MAX_SHORT_SIDE`` is shrunk to it; others are kept.
    """
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short < MIN_SHORT_SIDE:
        factor = max(1, min(math.ceil(MIN_SHORT_SIDE / short), MAX_LONG_SIDE // long))
        shown = image.resize((width * factor, height * factor), Image.NEAREST)
        return shown, f"{width}x{height} px, each pixel shown as {factor}x{factor}"
    if short > MAX_SHORT_SIDE:
        scale = MAX_SHORT_SIDE / short
        shown = image.resize((round(width * scale), round(height * scale)), Image.LANCZOS)
        return shown, f"{width}x{height} px, shown at {scale:.2f} of its size"
    return image, f"{width}x{height} px"


def attention_title(predicted: str, probability: float, true: str | None = None) -> str:
    """The headline of an attention figure, e.g. ``predicted: cat (0.9731) · true: cat``."""
    title = f"predicted: {predicted} ({probability:.4f})"
    return title if true is None else f"{title} · true: {true}"


def _colour_bar(width: int, height: int) -> Image.Image:
    """The jet colours from 0 (left) to 1 (right), framed."""
    row = jet(np.linspace(0.0, 1.0, width))  # (width, 3)
    bar = Image.fromarray(np.ascontiguousarray(np.broadcast_to(row, (height, width, 3))))
    ImageDraw.Draw(bar).rectangle((0, 0, width - 1, height - 1), outline=GREY)
    return bar


def attention_figure(
    image: Image.Image,
    mask: torch.Tensor | np.ndarray,
    title: str,
    caption: str = "",
    alpha: float = 0.5,
    correct: bool | None = None,
) -> np.ndarray:
    """The image (left) and its attention rollout over it (right), under a title, with a colour bar.

    Both panels are ``enlarge``'s picture of ``image``; the rollout ``mask`` (gh, gw) is stretched
    over it bilinearly (``overlay_heatmap``). The colour bar spans the mask's least to greatest
    value, labelled as a percentage: the share of the class token's rollout that each patch
    holds. ``caption`` (the file name, say) is a grey line under the title; ``correct`` colours
    the title green or red when the true class is known.
    """
    picture, scaling = enlarge(image.convert("RGB"))
    overlay = overlay_heatmap(picture, mask, alpha)
    values = _to_numpy(mask).astype(np.float64)
    width, height = picture.size
    big, small = _font(26), _font(17)
    pad, gap, bar_height = 24, 24, 18
    figure_width = max(2 * width + gap + 2 * pad, 640)
    top = pad + 36 + (26 if caption else 0) + 8  # the title, the caption, a little air
    figure_height = top + height + 10 + bar_height + 6 + 22 + pad
    figure = Image.new("RGB", (figure_width, figure_height), WHITE)
    draw = ImageDraw.Draw(figure)

    ink = BLACK if correct is None else GREEN if correct else RED
    draw.text((pad, pad), _fit(big, title, figure_width - 2 * pad), fill=ink, font=big)
    if caption:
        draw.text(
            (pad, pad + 36), _fit(small, caption, figure_width - 2 * pad), fill=GREY, font=small
        )
    left = (figure_width - 2 * width - gap) // 2  # the panels centred when the title is wider
    right = left + width + gap
    figure.paste(picture, (left, top))
    figure.paste(overlay, (right, top))

    below = top + height + 10
    draw.text((left, below), _fit(small, f"image: {scaling}", width), fill=GREY, font=small)
    figure.paste(_colour_bar(width, bar_height), (right, below))
    labels = below + bar_height + 6
    low, high = f"low {values.min():.2%}", f"high {values.max():.2%}"
    draw.text((right, labels), low, fill=BLACK, font=small)
    draw.text((right + width, labels), high, fill=BLACK, font=small, anchor="ra")
    middle = width - _text_width(small, low) - _text_width(small, high) - 24
    if middle > 0:  # the bar's meaning, between its ends, where there is room
        draw.text(
            (right + width / 2, labels), _fit(small, "rollout share per patch", middle),
            fill=GREY, font=small, anchor="ma",
        )  # fmt: skip
    return np.asarray(figure)


def figure_grid(figures: Sequence[np.ndarray]) -> np.ndarray:
    """Figures in rows and columns (as square as their number allows), each at the top left of
    its cell, a column as wide as its widest figure and a row as tall as its tallest, on white."""
    if not figures:
        raise ValueError("no figures to arrange")
    columns = math.ceil(math.sqrt(len(figures)))
    rows = math.ceil(len(figures) / columns)
    heights = [
        max(f.shape[0] for f in figures[r * columns : (r + 1) * columns]) for r in range(rows)
    ]
    widths = [max(f.shape[1] for f in figures[c::columns]) for c in range(columns)]
    tops, lefts = np.cumsum([0, *heights]), np.cumsum([0, *widths])
    grid = np.full((tops[-1], lefts[-1], 3), 255, dtype=np.uint8)
    for i, figure in enumerate(figures):
        y, x = tops[i // columns], lefts[i % columns]
        grid[y : y + figure.shape[0], x : x + figure.shape[1]] = figure
    return grid


def save_png(figure: np.ndarray, path: str | Path) -> Path:
    """Write an (H, W, 3) uint8 figure as a PNG, creating its folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(figure).save(path, format="PNG")
    return path


def log_eval_images(
    writer,
    step: int,
    images: torch.Tensor,
    preds,
    labels,
    cm: np.ndarray,
    class_names: Sequence[str],
    prefix: str = "test",
) -> None:
    """Add ``<prefix>/confusion_matrix`` and ``<prefix>/predictions`` to a SummaryWriter.

    ``images``, ``preds`` and ``labels`` are the first images of the evaluated set (normalised, as
    the model saw them) with their predicted and true classes; ``cm`` is the confusion matrix of
    the whole set. ``prefix``: "test", or "val" when a validation split is scored.
    """
    writer.add_image(
        f"{prefix}/confusion_matrix",
        confusion_matrix_image(cm, class_names),
        step,
        dataformats="HWC",
    )
    writer.add_image(
        f"{prefix}/predictions",
        prediction_grid(images, preds, labels, class_names),
        step,
        dataformats="HWC",
    )
