"""Seeded random weights in Google's ``.npz`` layout, and seeded images: numpy only.

Both sides build the same arrays from the same seed: ``make_logits.py`` (with jax, run by hand)
feeds them to Google's code and records its logits with the names and shapes of Google's own
parameter tree; the tests (no jax) rebuild them from that record and feed them to ours. Each
array is drawn at a scale that keeps activations of trained size through every layer (kernels
with variance 1/fan-in, norms' scales near 1, a ResNet unit's residual branch smaller than
its shortcut as training leaves it), so a numerical difference in any layer reaches
the logits rather than vanishing in a near-zero signal.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).parent
# Google's code the fixtures were made with, and how to run it (docs/models.md says more).
VIT_JAX_COMMIT = "c6de1e53"
NUM_CLASSES = 100
NUM_IMAGES = 2


@dataclass(frozen=True)
class Case:
    """One fixture: a model of Google's code and ours, the image size it runs at, and the size
    its weights were made for (the position embedding is resized as Google's fine-tuning loader
    resizes it when they differ)."""

    name: str
    google_model: str  # a name of vit_jax/configs/models.py's MODEL_CONFIGS
    model_type: str  # our --model_type
    img_size: int
    weights_size: int
    seed: int

    @property
    def path(self) -> Path:
        return HERE / f"{self.name}.json"


CASES = (
    Case("vit_b16_224", "ViT-B_16", "ViT-B_16", 224, 224, seed=1),
    Case("vit_b16_384", "ViT-B_16", "ViT-B_16", 384, 224, seed=2),
    Case("vit_s16_augreg_224", "ViT-S_16", "ViT-S_16", 224, 224, seed=3),
    Case("r50_vit_b16_224", "R50+ViT-B_16", "R50-ViT-B_16", 224, 224, seed=4),
    Case("mixer_b16_224", "Mixer-B_16", "Mixer-B_16", 224, 224, seed=5),
)


def _fan_in(name: str, shape: tuple[int, ...]) -> int:
    # Flax's attention kernels are (hidden, heads, head_dim) for query, key and value, and
    # (heads, head_dim, hidden) for out; a Dense kernel is (in, out), a Conv kernel HWIO.
    if "MultiHeadDotProductAttention" in name and "/out/" not in name:
        return shape[0]
    return int(np.prod(shape[:-1]))


def seeded_weights(params: list[tuple[str, tuple[int, ...]]], seed: int) -> dict[str, np.ndarray]:
    """Random float32 arrays for Google's parameter names and shapes, drawn in sorted name order."""
    rng = np.random.default_rng(seed)
    weights = {}
    for name, shape in sorted((n, tuple(s)) for n, s in params):
        noise = rng.standard_normal(shape, dtype=np.float32)
        leaf = name.rsplit("/", 1)[-1]
        if name.endswith("gn3/scale"):  # a ResNet unit's last norm: Google starts it at zero
            value = 0.25 * (1 + 0.1 * noise)
        elif leaf == "scale":  # LayerNorm and GroupNorm
            value = 1 + 0.1 * noise
        elif leaf == "bias":
            value = 0.05 * noise
        elif leaf in ("pos_embedding", "cls"):
            value = 0.2 * noise
        else:  # kernels
            value = noise / np.float32(np.sqrt(_fan_in(name, shape)))
        weights[name] = value.astype(np.float32)
    return weights


def seeded_images(size: int, seed: int) -> np.ndarray:
    """``NUM_IMAGES`` smooth random images in [-1, 1], NHWC as Google's code takes them.

    Smooth (a coarse grid of colours, bilinearly enlarged) rather than pixel noise, so that
    neighbouring patches look alike, as in photographs.
    """
    rng = np.random.default_rng(10_000 + seed)
    coarse = rng.uniform(-1, 1, (NUM_IMAGES, 8, 8, 3))
    at = np.linspace(0, 7, size)  # each pixel's place on the coarse grid
    low = np.minimum(at.astype(int), 6)
    w = at - low  # the weight of the next grid point
    rows = coarse[:, low] * (1 - w)[:, None, None] + coarse[:, low + 1] * w[:, None, None]
    image = rows[:, :, low] * (1 - w)[:, None] + rows[:, :, low + 1] * w[:, None]
    return image.astype(np.float32)


def write_fixture(case: Case, record: dict) -> None:
    """JSON with one line per parameter and per image's logits, for readable diffs."""
    fields = []
    for key, value in record.items():
        if isinstance(value, list):
            items = ",\n  ".join(json.dumps(item) for item in value)
            fields.append(f' "{key}": [\n  {items}\n ]')
        else:
            fields.append(f" {json.dumps(key)}: {json.dumps(value)}")
    case.path.write_text("{\n" + ",\n".join(fields) + "\n}\n")


def read_fixture(case: Case) -> dict:
    """What ``make_logits.py`` recorded: ``params`` ([name, shape] of the weights at
    ``weights_size``), ``logits`` (Google's, ``NUM_IMAGES`` x ``NUM_CLASSES``), ``made_with``."""
    return json.loads(case.path.read_text())
