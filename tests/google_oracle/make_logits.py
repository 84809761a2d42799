"""Regenerate the fixtures of tests/test_google_parity.py with Google's own Flax code.

    git clone https://github.com/google-research/vision_transformer ~/vision_transformer
    git -C ~/vision_transformer checkout c6de1e53
    python -m venv ~/jax-env && ~/jax-env/bin/pip install "jax[cpu]==0.10.2" flax==0.12.8 \
        ml_collections einops pandas scipy tqdm packaging
    ~/jax-env/bin/python -m tests.google_oracle.make_logits --vit_jax ~/vision_transformer

(run from the repository root; it needs neither torch nor this project's other code.) For each
case of ``weights.CASES`` it builds Google's model from Google's config, makes seeded random
weights for the names and shapes of Google's own parameter tree, saves them as a ``.npz``, loads
that with Google's ``checkpoint.load`` (strictly checked by ``inspect_params``) or, where the
image size differs from the weights', with ``checkpoint.load_pretrained`` (which resizes the
position embedding as Google's fine-tuning does), and records Google's logits for seeded images.
Google's modules are imported from the checkout, not copied; ``checkpoint.py`` imports ``gfile``
from TensorFlow, for which a stand-in that opens local files is enough.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import types
from importlib.metadata import version
from pathlib import Path

import numpy as np

from tests.google_oracle.weights import (
    CASES,
    NUM_CLASSES,
    VIT_JAX_COMMIT,
    Case,
    seeded_images,
    seeded_weights,
    write_fixture,
)


def _import_google_checkpoint() -> types.ModuleType:
    """Google's ``vit_jax.checkpoint``, whose ``from tensorflow.io import gfile`` gets a stand-in
    (``gfile.GFile`` is ``open``) for as long as the import takes: Flax looks for TensorFlow when
    its own ``io`` is first imported, and einops whenever it meets an array, so neither may see it.
    """
    import flax.training.checkpoints  # noqa: F401

    tensorflow, io, gfile = (types.ModuleType(n) for n in ("tensorflow", "tf.io", "tf.gfile"))
    gfile.GFile = open
    io.gfile, tensorflow.io = gfile, io
    sys.modules.update({"tensorflow": tensorflow, "tensorflow.io": io})
    try:
        from vit_jax import checkpoint
    finally:
        del sys.modules["tensorflow"], sys.modules["tensorflow.io"]
    return checkpoint


def _checked_commit(checkout: Path, allow_other: bool) -> str:
    try:
        head = subprocess.run(
            ["git", "-C", str(checkout), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        sys.exit(f"--vit_jax {checkout}: not a git checkout of google-research/vision_transformer")
    if not head.startswith(VIT_JAX_COMMIT) and not allow_other:
        sys.exit(
            f"--vit_jax {checkout} is at {head[:8]}, the fixtures are of {VIT_JAX_COMMIT}: "
            f"git -C {checkout} checkout {VIT_JAX_COMMIT} (or pass --allow_other_commit)"
        )
    return head


def published_names(tree: dict) -> dict:
    """Google's parameter tree under the names of its published ``.npz`` files.

    Flax's ``linen`` numbers the unnamed submodules of a module per type (``LayerNorm_0``,
    ``MultiHeadDotProductAttention_0``, ``LayerNorm_1``, ``MlpBlock_0``); the files were written
    by its predecessor, which numbered them all with one counter in the order they were made
    (``LayerNorm_0``, ``MultiHeadDotProductAttention_1``, ``LayerNorm_2``, ``MlpBlock_3``).
    Google's ``checkpoint.load`` converts the second into the first (Flax's
    ``convert_pre_linen``); this is the inverse, from an un-jitted init's dicts, which keep that
    order. Named submodules (``encoderblock_0``, ``token_mixing``) keep their names.
    """
    renamed, counter = {}, 0
    for key, value in tree.items():
        if re.fullmatch(r"[A-Z]\w*_\d+", key):
            key, counter = f"{key.rsplit('_', 1)[0]}_{counter}", counter + 1
        renamed[key] = published_names(value) if isinstance(value, dict) else value
    return renamed


def google_logits(case: Case, workdir: Path) -> dict:
    """Google's logits for one case, with the parameter names and shapes they were made with."""
    import flax
    import jax
    import jax.numpy as jnp
    from vit_jax import models_mixer, models_vit
    from vit_jax.configs.models import MODEL_CONFIGS

    checkpoint = _import_google_checkpoint()
    config = MODEL_CONFIGS[case.google_model]
    family = models_mixer.MlpMixer if "Mixer" in case.google_model else models_vit.VisionTransformer
    model = family(num_classes=NUM_CLASSES, **config)

    def init(size: int) -> dict:
        # not jitted: a jitted init returns its dicts with sorted keys, not in creation order
        blank = jnp.zeros((1, size, size, 3), jnp.float32)
        return flax.core.unfreeze(model.init(jax.random.PRNGKey(0), blank, train=False)["params"])

    init_params = init(case.weights_size)
    flat = flax.traverse_util.flatten_dict(published_names(init_params), sep="/")
    spec = [(name, list(array.shape)) for name, array in sorted(flat.items())]
    weights = seeded_weights(spec, case.seed)
    npz = workdir / f"{case.name}.npz"
    np.savez(npz, **weights)

    # Google's loader turns the published names back into its own, checked name by name here.
    params = checkpoint.inspect_params(params=checkpoint.load(npz), expected=init_params)
    if case.img_size != case.weights_size:
        params = flax.core.unfreeze(
            checkpoint.load_pretrained(
                pretrained_path=npz,
                init_params=flax.core.unfreeze(init(case.img_size)),
                model_config=config,
            )
        )
        # load_pretrained gives the head a fresh start (Google's zero init); keep the seeded one,
        # so that the logits show every layer.
        params["head"] = {"kernel": weights["head/kernel"], "bias": weights["head/bias"]}
    images = seeded_images(case.img_size, case.seed)
    logits = np.asarray(model.apply({"params": params}, images, train=False), np.float64)
    return {
        "case": case.name,
        "google_model": case.google_model,
        "model_type": case.model_type,
        "img_size": case.img_size,
        "weights_size": case.weights_size,
        "seed": case.seed,
        "params": spec,
        "logits": logits.tolist(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vit_jax", type=Path, required=True, help="a checkout of Google's repo")
    parser.add_argument("--only", nargs="*", help="case names (default: all)")
    parser.add_argument("--allow_other_commit", action="store_true")
    args = parser.parse_args()
    head = _checked_commit(args.vit_jax, args.allow_other_commit)
    sys.path.insert(0, str(args.vit_jax.absolute()))
    made_with = {
        "vit_jax": head,
        **{name: version(name) for name in ("jax", "jaxlib", "flax", "numpy", "scipy")},
    }
    with tempfile.TemporaryDirectory() as workdir:
        for case in CASES:
            if args.only and case.name not in args.only:
                continue
            record = google_logits(case, Path(workdir))
            write_fixture(case, {**record, "made_with": made_with})
            top = np.abs(np.asarray(record["logits"])).max()
            print(f"{case.name}: {len(record['params'])} arrays, largest |logit| {top:.3f}")


if __name__ == "__main__":
    main()
