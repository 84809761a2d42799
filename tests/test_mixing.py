"""Mixup and cutmix of pairs (utils/data/mixing.py), against their formulas, and the property
that keeps torchrun and accumulation exact: a slice of the global batch mixes as in the whole."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from utils.data.mixing import BatchMixing, pair_draws

BOTH = BatchMixing(num_classes=5, seed=3, mixup=0.8, cutmix=1.0, switch_prob=0.5)


def batch(
    n: int = 8, size: int = 16, dtype: torch.dtype = torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(n)
    images = torch.randn(n, 3, size, size, generator=g).to(dtype)
    return images, torch.randint(0, 5, (n,), generator=g)


def box_mask(box: np.ndarray, size: int = 16) -> torch.Tensor:
    top, bottom, left, right = box
    inside = torch.zeros(size, size, dtype=torch.bool)
    inside[top:bottom, left:right] = True
    return inside


def test_a_slice_of_the_global_batch_mixes_as_in_the_whole() -> None:
    images, labels = batch(16)
    draws = pair_draws(3, 7, 8, 16, 16, mixup=0.8, cutmix=1.0)
    assert draws.cutmix.any() and not draws.cutmix.all()  # both methods are checked
    whole = BOTH(images, labels, 7, 0, 16)
    for width in (2, 4, 8):  # 8, 4 or 2 processes, or as many micro-batches
        parts = [
            BOTH(images[o : o + width], labels[o : o + width], 7, o, 16)
            for o in range(0, 16, width)
        ]
        assert torch.equal(torch.cat([p[0] for p in parts]), whole[0])
        assert torch.equal(torch.cat([p[1] for p in parts]), whole[1])


def test_draws_depend_on_seed_and_step_alone() -> None:
    images, labels = batch(8)
    a, b = BOTH(images, labels, 7, 0, 8), BOTH(images, labels, 7, 0, 8)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(BOTH(images, labels, 8, 0, 8)[0], a[0])
    other_seed = BatchMixing(num_classes=5, seed=4, mixup=0.8, cutmix=1.0)
    assert not torch.equal(other_seed(images, labels, 7, 0, 8)[0], a[0])


def test_targets_are_probabilities_and_one_hot_when_nothing_is_mixed() -> None:
    images, labels = batch(8)
    targets = BOTH(images, labels, 1, 0, 8)[1]
    assert targets.dtype == torch.float32 and targets.shape == (8, 5)
    assert (targets >= 0).all()
    torch.testing.assert_close(targets.sum(1), torch.ones(8))
    # 1 px images: every cut box is empty, so lam = 1 and nothing changes
    tiny, labels = batch(8, size=1)
    mixed, targets = BatchMixing(num_classes=5, seed=0, cutmix=1.0)(tiny, labels, 1, 0, 8)
    assert torch.equal(mixed, tiny)
    assert torch.equal(targets, torch.nn.functional.one_hot(labels, 5).float())


def test_mixup_follows_its_formula() -> None:
    mixing = BatchMixing(num_classes=5, seed=1, mixup=0.4)
    images, labels = batch(6)
    mixed, targets = mixing(images, labels, 2, 0, 6)
    lam = pair_draws(1, 2, 3, 16, 16, mixup=0.4, cutmix=0.0).lam
    assert ((lam > 0) & (lam < 1)).all()
    for i in range(6):
        j, share = i ^ 1, float(lam[i // 2])
        torch.testing.assert_close(mixed[i], share * images[i] + (1 - share) * images[j])
        expected = torch.zeros(5)
        expected[labels[i]] += share
        expected[labels[j]] += 1 - share
        torch.testing.assert_close(targets[i], expected)


def test_cutmix_pastes_the_partners_box_and_weighs_targets_by_area() -> None:
    mixing = BatchMixing(num_classes=5, seed=2, cutmix=1.0)
    images, labels = batch(8)
    mixed, targets = mixing(images, labels, 5, 0, 8)
    draws = pair_draws(2, 5, 4, 16, 16, mixup=0.0, cutmix=1.0)
    assert draws.cutmix.all() and (draws.lam < 1).any()
    for i in range(8):
        j, inside = i ^ 1, box_mask(draws.box[i // 2])
        assert torch.equal(mixed[i][:, inside], images[j][:, inside])
        assert torch.equal(mixed[i][:, ~inside], images[i][:, ~inside])
        kept = 1 - inside.double().mean().item()
        assert draws.lam[i // 2] == pytest.approx(kept)
        expected = torch.zeros(5)
        expected[labels[i]] += kept
        expected[labels[j]] += 1 - kept
        torch.testing.assert_close(targets[i], expected)


def test_the_box_is_timms_rand_bbox() -> None:
    """Sides sqrt(1 - lam) of the image's, half each side of a uniform centre, clipped to the
    image (so boxes touch every edge), and lam then the uncovered share."""
    draws = pair_draws(5, 1, 2000, 24, 32, mixup=0.0, cutmix=1.0)
    top, bottom, left, right = draws.box.T
    assert (top >= 0).all() and (top <= bottom).all() and (bottom <= 24).all()
    assert (left >= 0).all() and (left <= right).all() and (right <= 32).all()
    assert (top == 0).any() and (bottom == 24).any() and (left == 0).any() and (right == 32).any()
    np.testing.assert_allclose(draws.lam, 1 - (bottom - top) * (right - left) / (24 * 32))


def test_which_method_and_how_much() -> None:
    def over_steps(**alphas: float) -> tuple[np.ndarray, np.ndarray]:
        draws = [pair_draws(0, step, 16, 32, 32, **alphas) for step in range(1, 251)]
        return np.concatenate([d.cutmix for d in draws]), np.concatenate([d.lam for d in draws])

    assert not over_steps(mixup=0.8, cutmix=0.0)[0].any()
    assert over_steps(mixup=0.0, cutmix=1.0)[0].all()
    cut, _ = over_steps(mixup=0.8, cutmix=1.0, switch_prob=0.3)
    assert abs(cut.mean() - 0.3) < 0.03  # 4000 pairs: the standard error is 0.007
    # Beta(0.8, 0.8): mean 0.5, variance 1 / (4 (2 alpha + 1)) = 0.096
    _, lam = over_steps(mixup=0.8, cutmix=0.0)
    assert abs(lam.mean() - 0.5) < 0.02
    assert abs(lam.var() - 1 / (4 * 2.6)) < 0.01
    # cutmix's lam is the uncovered share: boxes clipped at the edges cover less than
    # 1 - Beta(1, 1), E[side] = r - r**2 / 4 for side ratio r = sqrt(U), so E[lam] is about
    # 1 - (1/2 - 1/5 + 1/48) = 0.68, a little more for the truncated sides (timm's alike)
    _, lam = over_steps(mixup=0.0, cutmix=1.0)
    assert ((lam >= 0) & (lam <= 1)).all() and 0.66 < lam.mean() < 0.74


def test_low_precision_images_keep_their_dtype() -> None:
    images, labels = batch(4, dtype=torch.bfloat16)
    mixed, targets = BOTH(images, labels, 1, 0, 4)
    assert mixed.dtype == torch.bfloat16 and targets.dtype == torch.float32
    expected = BOTH(images.float(), labels, 1, 0, 4)[0].to(torch.bfloat16)
    assert torch.equal(mixed, expected)  # mixed in fp32, rounded once


def test_pairs_need_even_sizes_within_the_batch_and_both_off_is_inactive() -> None:
    images, labels = batch(4)
    with pytest.raises(ValueError, match="even batch and offset"):
        BOTH(images[:3], labels[:3], 1, 0, 4)
    with pytest.raises(ValueError, match="even batch and offset"):
        BOTH(images[:2], labels[:2], 1, 1, 4)
    with pytest.raises(ValueError, match="outside"):
        BOTH(images, labels, 1, 2, 4)
    assert not BatchMixing(num_classes=5, seed=0).active
    assert BOTH.active and BatchMixing(num_classes=5, seed=0, cutmix=0.1).active
    assert (pair_draws(0, 1, 2, 8, 8, mixup=0.0, cutmix=0.0).lam == 1).all()
