"""Images given on a command line, read and transformed exactly as training's evaluation does.

``load_image`` and ``collect_images`` read files and folders (one-line errors for what Pillow
cannot decode, whole, or ``to_rgb`` cannot convert); ``preprocess`` makes the tensor of the test
transform: bilinear antialiased resize in float32, then [-1, 1].
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from models.errors import UsageError, one_line
from utils.data.augment import normalize, resize
from utils.data.image_folder import to_rgb


def load_image(path: str | Path) -> Image.Image:
    """An image file as 8-bit RGB; UsageError if it cannot be read or converted.

    Converted as training's image folders convert it (``utils.data.image_folder.to_rgb``: 16-bit
    scaled, transparency over white, pixels as stored, no EXIF rotation), so that a file scores
    here exactly as it does in evaluation.
    """
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"image {path}: no such file")
    try:
        with Image.open(path) as image:
            return to_rgb(image)  # decodes the whole file
    except Exception as error:  # UnidentifiedImageError, truncated data, a refused mode...
        raise UsageError(
            f"image {path} cannot be read ({one_line(error)}); pass a file Pillow can open "
            "(PNG, JPEG, BMP, WebP...)"
        ) from None


def collect_images(paths: list[str]) -> list[tuple[str, Image.Image]]:
    """Each file given, and each readable image in each folder given (others noted on stderr)."""
    found = []
    for given in paths:
        folder = Path(given)
        if not folder.is_dir():
            found.append((given, load_image(given)))
            continue
        inside = []
        for path in sorted(f for f in folder.rglob("*") if f.is_file()):
            if any(part.startswith(".") for part in path.relative_to(folder).parts):
                continue  # hidden files and folders
            try:
                inside.append((str(path), load_image(path)))
            except UsageError as error:
                print(f"skipping {path}: {error}", file=sys.stderr)
        if not inside:
            raise UsageError(f"folder {folder} holds no image that Pillow can read")
        found += inside
    return found


def preprocess(image: Image.Image, img_size: int) -> torch.Tensor:
    """(3, img_size, img_size) float32 in [-1, 1], as ``CifarDataset`` makes test images.

    Any size or aspect is resized (not cropped) to the square input, bilinear with antialiasing,
    in float32 on 0..255 values, then normalised with the training mean and std.
    """
    pixels = torch.from_numpy(np.array(to_rgb(image), dtype=np.uint8)).permute(2, 0, 1)
    return normalize(resize(pixels.float(), img_size))  # (3, H, W), 0..255 before normalising
