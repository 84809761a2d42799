"""Write a trained checkpoint in Google's .npz layout, for load_from, timm or JAX code.

python export.py --checkpoint output/cifar10-100_500_checkpoint.bin --output model.npz

The model flags default to those recorded with the checkpoint (the .json beside a .bin, or inside
a _last.pt); a bare .bin of the reference implementation needs them on the command line. An
--img_size other than the training one resizes the position embedding first. A .npz records no
GELU: an exported model whose GELU is not Google's (tanh) is named as such in one more line.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from models.errors import UsageError
from models.npz_io import export_npz_weights
from utils.cli import Parser, add_checkpoint_args, add_model_args, run_main
from utils.files import atomic_write
from utils.inspection.inference import load_from_args


def build_parser() -> argparse.ArgumentParser:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(p, from_checkpoint=True)
    add_checkpoint_args(p)
    p.add_argument("--output", required=True, metavar="PATH.npz", help="the .npz file to write")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    output = Path(args.output)
    if output.suffix != ".npz":
        raise UsageError(f"--output {output} should end in .npz")
    loaded = load_from_args(args)
    arrays = export_npz_weights(loaded.model)
    try:
        atomic_write(output, lambda f: np.savez(f, **arrays))
    except OSError as error:
        raise UsageError(f"--output {output} cannot be written ({error.strerror})") from None
    print(f"wrote {output}: {loaded.flags}, {len(loaded.classes)} classes, {len(arrays)} arrays")
    if loaded.model.config.gelu != "tanh":  # Google's; a .npz cannot say otherwise
        print(
            f"note: this model computes the {loaded.model.config.gelu} GELU, which a .npz does not "
            f"record: pass --config gelu={loaded.model.config.gelu} to this project when you load "
            "it (timm's default GELU is the exact one; Google's code computes tanh)"
        )
    return 0


if __name__ == "__main__":
    run_main(main, "export.py")
