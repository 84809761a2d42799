"""Google's own code as the oracle: our models, as built by default, compute the logits that
Google's Flax code (vit_jax at the commit ``weights.VIT_JAX_COMMIT``) computed for the same
seeded weights and images, for every family: ViT at 224 px and at 384 px (the position embedding
resized as Google's fine-tuning loader resizes it), an AugReg-size ViT, the R50 hybrid and a Mixer.

The fixtures hold Google's logits and the names and shapes of the weights; the weights and the
images are rebuilt here from their seeds (``tests/google_oracle/weights.py``), so jax is needed
only to make the fixtures again (``tests/google_oracle/make_logits.py``).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from models.families import build_model
from models.npz_io import export_npz_weights
from tests.google_oracle.make_logits import published_names
from tests.google_oracle.weights import (
    CASES,
    NUM_CLASSES,
    Case,
    read_fixture,
    seeded_images,
    seeded_weights,
)

# float32 noise: measured at most 3.3e-6 here (largest logit 4.3), docs/models.md
TOLERANCE = 2e-5


def our_logits(case: Case, record: dict, overrides: list[str]) -> np.ndarray:
    model = build_model(case.model_type, overrides, case.img_size, NUM_CLASSES, zero_head=False)
    model.load_from(seeded_weights(record["params"], case.seed))  # resized to img_size if needed
    images = torch.from_numpy(seeded_images(case.img_size, case.seed)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model.eval()(images)[0].double().numpy()


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_default_model_computes_googles_logits(case: Case) -> None:
    record = read_fixture(case)
    assert (record["model_type"], record["img_size"], record["seed"]) == (
        case.model_type, case.img_size, case.seed
    )  # fmt: skip
    expected = np.asarray(record["logits"])
    assert expected.shape == (2, NUM_CLASSES) and np.abs(expected).max() > 1  # logits, not noise

    ours = our_logits(case, record, [])
    assert np.abs(ours - expected).max() < TOLERANCE

    if case.name in ("vit_b16_224", "mixer_b16_224"):  # each family's MLP, once
        # the fixture tells the two GELUs apart by 10x its tolerance: it could catch a stray layer
        exact = our_logits(case, record, ["gelu=exact"])
        assert np.abs(exact - expected).max() > 10 * TOLERANCE


LAYOUTS = [c for c in CASES if c.name in ("vit_b16_224", "r50_vit_b16_224", "mixer_b16_224")]


@pytest.mark.parametrize("case", LAYOUTS, ids=lambda c: c.name)
def test_fixture_names_are_those_our_export_writes(case: Case) -> None:
    """The names and shapes Google's code was given (its own parameter tree, under the names of
    its published files) are those of our export: one layout, seen from both sides."""
    record = read_fixture(case)
    model = build_model(case.model_type, [], case.weights_size, NUM_CLASSES)
    exported = {name: list(array.shape) for name, array in export_npz_weights(model).items()}
    squeezed = {name: [n for n in shape if n != 1] for name, shape in exported.items()}
    given = {name: [n for n in shape if n != 1] for name, shape in record["params"]}
    assert given == squeezed


def test_published_names_number_unnamed_modules_with_one_counter() -> None:
    """Flax linen's per-type numbering back into the single counter of Google's published files
    (the inverse of Flax's ``convert_pre_linen``)."""
    block = {"LayerNorm_0": 1, "MultiHeadDotProductAttention_0": 2, "LayerNorm_1": 3,
             "MlpBlock_0": {"Dense_0": 4, "Dense_1": 5}}  # fmt: skip
    tree = {"embedding": 0, "Transformer": {"encoderblock_0": block, "encoder_norm": 6}}
    renamed = published_names(tree)["Transformer"]["encoderblock_0"]
    assert list(renamed) == ["LayerNorm_0", "MultiHeadDotProductAttention_1", "LayerNorm_2",
                             "MlpBlock_3"]  # fmt: skip
    assert renamed["MlpBlock_3"] == {"Dense_0": 4, "Dense_1": 5}
    mixer = {"stem": 0, "MixerBlock_0": {"LayerNorm_0": 1, "token_mixing": 2, "LayerNorm_1": 3}}
    assert published_names(mixer) == mixer
