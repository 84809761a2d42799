"""Draw where a trained ViT looks: attention rollout over all layers, over the image, as a PNG.

python visualize_attention.py --checkpoint output/x_checkpoint.bin cat.jpg --output cat.png

Rollout (Abnar & Zuidema 2020) multiplies the head-averaged attention of every layer, with the
residual path, and keeps the class token's row. The map is stretched to the original image's size.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from models.errors import UsageError
from utils.cli import Parser, add_checkpoint_args, add_model_args, run_main
from utils.inspection.inference import load_from_args, load_image, preprocess
from utils.inspection.rollout import overlay_heatmap, rollout_masks


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, from_checkpoint=True)
    add_checkpoint_args(p)
    p.add_argument("image", metavar="IMAGE", help="an image file Pillow reads")
    p.add_argument("--output", required=True, metavar="PATH.png", help="the PNG to write")
    p.add_argument(
        "--discard_ratio",
        type=float,
        default=0.0,
        help="drop this fraction of the weakest attention per layer, in [0, 1) (default: 0)",
    )
    p.add_argument("--alpha", type=float, default=0.5, help="heat-map opacity (default: 0.5)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not 0.0 <= args.discard_ratio < 1.0 or not 0.0 <= args.alpha <= 1.0:
        raise UsageError("--discard_ratio must be in [0, 1) and --alpha in [0, 1]")
    picture = load_image(args.image)
    loaded = load_from_args(args, vis=True)
    x = preprocess(picture, loaded.flags.img_size)[None].to(loaded.device)
    logits, masks = rollout_masks(loaded.model, x, args.discard_ratio)
    overlay = overlay_heatmap(picture, masks[0].cpu(), args.alpha)
    output = Path(args.output)
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
        overlay.save(output, format="PNG")
    except OSError as error:
        raise UsageError(f"--output {output} cannot be written ({error.strerror})") from None
    prob, index = logits[0].double().softmax(-1).max(-1)
    name = loaded.classes[index]
    print(f"{args.image}: {name} ({prob:.4f}); attention rollout written to {output}")
    return 0


if __name__ == "__main__":
    run_main(main, "visualize_attention.py")
