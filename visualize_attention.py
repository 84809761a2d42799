"""Draw where a trained ViT looks: the attention rollout over each image, as a figure.

python visualize_attention.py --checkpoint output/x_checkpoint.bin cat.jpg --output cat.png
python visualize_attention.py --checkpoint output/x_checkpoint.bin photos/ --output maps/
python visualize_attention.py --checkpoint output/x_checkpoint.bin a.png b.png --grid

A figure shows the image and the rollout over it side by side, at least 384 px on the short
side (a small image enlarged by whole-pixel blocks, nearest-neighbour, so the pixels the model
saw stay as they are; a large photo shrunk to 512 px), titled with the predicted class and its
probability, and the true class when known: --label for a single image, or the name of the
folder holding an image when it is a class of the checkpoint (photos/cat/1.jpg is a cat). A
colour bar spans the least to the greatest share of the class token's rollout that a patch holds.

Where the figures go (--output):
  PATH.png      a single image's figure; with --grid, every image's figure in this one PNG
  FOLDER        anything not ending in .png (default: attention): one <stem>_attention.png per
                image, a folder argument's layout mirrored inside; with --grid, one
                attention_grid.png there

Rollout (Abnar & Zuidema 2020) multiplies the head-averaged attention of every layer, with the
residual path, and keeps the class token's row. The map is stretched to the image's own shape.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from models.configs import is_mixer
from models.errors import UsageError
from utils.cli import Parser, add_checkpoint_args, add_model_args, run_main
from utils.inspection.figures import attention_figure, attention_title, figure_grid, save_png
from utils.inspection.images import collect_images, preprocess
from utils.inspection.inference import load_from_args
from utils.inspection.rollout import rollout_masks

MAX_GRID = 64  # figures in one --grid PNG: 8 x 8 of CIFAR's are already some 6700 px wide


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, from_checkpoint=True)
    add_checkpoint_args(p)
    p.add_argument(
        "images",
        nargs="+",
        metavar="IMAGE",
        help="image files, or folders: every image Pillow reads inside, recursively, sorted",
    )
    p.add_argument(
        "--output",
        default="attention",
        metavar="PATH",
        help="a .png file (a single image, or --grid), else a folder of <stem>_attention.png "
        "files (default: attention)",
    )
    p.add_argument(
        "--grid",
        action="store_true",
        help=f"draw every figure into one PNG, at most {MAX_GRID} images (default: one PNG each)",
    )
    p.add_argument(
        "--label",
        metavar="CLASS",
        default=None,
        help="the true class of a single IMAGE, for the title (default: the name of the folder "
        "that holds each image, when it is a class of the checkpoint; else none)",
    )
    p.add_argument(
        "--discard_ratio",
        type=float,
        default=0.0,
        help="drop this fraction of the weakest attention per layer, in [0, 1) (default: 0)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity (default: 0.5)")
    return p


@dataclass
class Listed:
    name: str  # as found: the argument, or a path inside a folder argument
    relative: Path  # its place under an --output folder
    picture: Image.Image


def list_images(paths: list[str]) -> list[Listed]:
    """The images that the IMAGE arguments name, each with its path relative to the folder given
    (a file's own name when it was given itself)."""
    listed = []
    for given in paths:
        root = Path(given) if Path(given).is_dir() else Path(given).parent
        for name, picture in collect_images([given]):
            listed.append(Listed(name, Path(name).relative_to(root), picture))
    return listed


def figure_paths(listed: list[Listed], output: Path) -> list[Path]:
    """One ``<stem>_attention.png`` per image under the ``output`` folder; UsageError if two
    images would write the same file."""
    paths: dict[Path, str] = {}
    for item in listed:
        path = output / item.relative.with_name(f"{item.relative.stem}_attention.png")
        if path in paths:
            raise UsageError(
                f"{paths[path]} and {item.name} would both be drawn to {path}; rename one, or "
                "pass --grid for one PNG"
            )
        paths[path] = item.name
    return list(paths)


def plan_output(args: argparse.Namespace, listed: list[Listed]) -> list[Path]:
    """Where the figures go: one path per image, or a single path for --grid."""
    output = Path(args.output)
    is_png = output.suffix.lower() == ".png"
    if not is_png and output.exists() and not output.is_dir():
        raise UsageError(f"--output {output} is a file, not a folder; pass a folder or a .png path")
    if args.grid:
        if len(listed) > MAX_GRID:
            raise UsageError(
                f"--grid draws at most {MAX_GRID} images, {len(listed)} given; pass an --output "
                "folder for one figure each"
            )
        return [output if is_png else output / "attention_grid.png"]
    if is_png and len(listed) > 1:
        raise UsageError(
            f"--output {output} is one PNG for {len(listed)} images; pass a folder for one "
            "figure each, or add --grid"
        )
    return [output] if is_png else figure_paths(listed, output)


def true_class(item: Listed, label: str | None, classes: list[str]) -> str | None:
    """``--label``, else the image's folder name when it names a class, else unknown."""
    if label is not None:
        return label
    folder = Path(item.name).parent.name
    return folder if folder in classes else None


def write(figure: np.ndarray, path: Path) -> None:
    try:
        save_png(figure, path)
    except OSError as error:
        raise UsageError(f"--output {path} cannot be written ({error.strerror})") from None


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.discard_ratio < 1.0 or not 0.0 <= args.alpha <= 1.0:
        raise UsageError("--discard_ratio must be in [0, 1) and --alpha in [0, 1]")
    listed = list_images(args.images)  # every file checked before the model
    if args.label is not None and len(listed) != 1:
        raise UsageError(
            f"--label names the class of a single image, {len(listed)} given; put each image "
            "in a folder named after its class instead"
        )
    destinations = plan_output(args, listed)
    loaded = load_from_args(args, vis=True)
    if is_mixer(loaded.model.config):
        raise UsageError(
            f"--checkpoint {loaded.checkpoint.path} is an MLP-Mixer ({loaded.flags.model_type}): "
            "it mixes tokens with MLPs and has no attention to draw"
        )
    if args.label is not None and args.label not in loaded.classes:
        shown = ", ".join(loaded.classes[:10]) + (", ..." if len(loaded.classes) > 10 else "")
        raise UsageError(f"--label {args.label} is not a class of the checkpoint ({shown})")

    figures, lines = [], []
    for i, item in enumerate(listed):
        x = preprocess(item.picture, loaded.flags.img_size)[None].to(loaded.device)
        logits, masks = rollout_masks(loaded.model, x, args.discard_ratio)
        prob, index = logits[0].double().softmax(-1).max(-1)
        predicted, true = loaded.classes[index], true_class(item, args.label, loaded.classes)
        title = attention_title(predicted, float(prob), true)
        correct = None if true is None else predicted == true
        figure = attention_figure(
            item.picture, masks[0].cpu(), title, item.name, args.alpha, correct
        )
        if args.grid:
            figures.append(figure)
            lines.append(f"{item.name}: {title}")
            continue
        write(figure, destinations[i])
        print(f"{item.name}: {title}; attention figure written to {destinations[i]}")
    if args.grid:
        write(figure_grid(figures), destinations[0])
        for line in lines:
            print(f"{line}; in the attention grid written to {destinations[0]}")
    return 0


if __name__ == "__main__":
    run_main(main, "visualize_attention.py")
