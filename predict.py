"""Classify image files with a trained checkpoint: the top classes and their probabilities.

python predict.py --checkpoint output/cifar10-100_500_checkpoint.bin cat.jpg dog.png

Any size and any format Pillow reads; each image is resized to --img_size as test images are.
The model flags default to those recorded beside the checkpoint.
"""

from __future__ import annotations

import argparse
import json

import torch

from models.errors import UsageError
from utils.cli import Parser, add_checkpoint_args, add_model_args, run_main
from utils.inspection.images import collect_images, preprocess
from utils.inspection.inference import load_from_args, top_k


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
    p.add_argument("--top_k", type=int, default=5, help="classes to list per image (default: 5)")
    p.add_argument(
        "--batch_size", type=int, default=32, help="images per forward pass (default: 32)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON document instead of text")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.top_k <= 0 or args.batch_size <= 0:
        raise UsageError("--top_k and --batch_size must be positive")
    named = collect_images(args.images)  # every file checked before the model
    names, pictures = [n for n, _ in named], [p for _, p in named]
    loaded = load_from_args(args)
    classes = loaded.classes
    results = []
    for start in range(0, len(pictures), args.batch_size):
        chunk = slice(start, start + args.batch_size)
        batch = torch.stack([preprocess(p, loaded.flags.img_size) for p in pictures[chunk]])
        probs, indices = top_k(loaded.model, batch, args.top_k, loaded.device)
        for path, p, idx in zip(names[chunk], probs.tolist(), indices.tolist(), strict=True):
            top = [
                {"class": classes[i], "index": i, "probability": v}
                for v, i in zip(p, idx, strict=True)
            ]
            results.append({"image": path, "top": top})
    if args.json:
        for entry in (e for r in results for e in r["top"]):
            entry["probability"] = round(entry["probability"], 6)  # float64 noise is not signal
        print(json.dumps(results, indent=1))
        return 0
    width = max(len(c) for c in classes)
    for result in results:
        print(result["image"])
        for rank, entry in enumerate(result["top"], 1):
            print(f"  {rank}. {entry['class']:<{width}}  {entry['probability']:.4f}")
    return 0


if __name__ == "__main__":
    run_main(main, "predict.py")
