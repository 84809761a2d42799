"""``--mixup`` and ``--cutmix``: training images mixed in pairs, their targets alike.

Written here rather than taken from torchvision's ``v2.MixUp``/``v2.CutMix``: those draw one
lambda per batch from the global RNG and pair each image with its neighbour by ``roll(1)``, so an
image's partner and mix would depend on how the global batch is cut across processes and
micro-batches. Here the global batch's positions (2k, 2k + 1) are a pair (timm's "pair" mode),
and every pair's draws are a function of (seed, step, global position) alone, made on the host
for the whole global batch (a few hundred numbers) and sliced: a process holding positions
[offset, offset + B) mixes exactly as one process holding them all, so torchrun, gradient
accumulation and a resume stay exact.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from utils.data.augment import mix_seed
from utils.data.sampling import to_device


@dataclass(frozen=True)
class PairDraws:
    """Each pair's draws: whether it is cut-mixed, its lambda, and its box (rows [top, bottom),
    columns [left, right); drawn for every pair, used by the cut-mixed ones)."""

    cutmix: np.ndarray  # (pairs,) bool
    lam: np.ndarray  # (pairs,) float64: the share of an image's own pixels and target
    box: np.ndarray  # (pairs, 4) int64: top, bottom, left, right


def pair_draws(
    seed: int,
    step: int,
    pairs: int,
    height: int,
    width: int,
    *,
    mixup: float,
    cutmix: float,
    switch_prob: float = 0.5,
) -> PairDraws:
    """The draws of all ``pairs`` pairs of step ``step``'s global batch, from (seed, step) alone.

    With both alphas > 0 a pair is cut-mixed with probability ``switch_prob``, else the one that
    is on. lam ~ Beta(alpha, alpha) of the pair's method; a cut-mixed pair's box is timm's
    ``rand_bbox`` (side ratio sqrt(1 - lam), centre uniform, clipped to the image), and its lam
    then the share of the image left uncovered (timm's ``correct_lam``). Both alphas 0: lam 1.
    """
    rng = np.random.default_rng(mix_seed("mix", seed, step))
    switch = rng.random(pairs)
    lam_mix = rng.beta(mixup, mixup, pairs) if mixup > 0 else np.ones(pairs)
    lam_cut = rng.beta(cutmix, cutmix, pairs) if cutmix > 0 else np.ones(pairs)
    centre_y, centre_x = rng.integers(0, height, pairs), rng.integers(0, width, pairs)
    cut = switch < switch_prob if mixup > 0 and cutmix > 0 else np.full(pairs, cutmix > 0)
    ratio = np.sqrt(1 - lam_cut)
    half_h, half_w = (height * ratio).astype(np.int64) // 2, (width * ratio).astype(np.int64) // 2
    top, bottom = np.clip(centre_y - half_h, 0, height), np.clip(centre_y + half_h, 0, height)
    left, right = np.clip(centre_x - half_w, 0, width), np.clip(centre_x + half_w, 0, width)
    covered = (bottom - top) * (right - left) / (height * width)
    lam = np.where(cut, 1 - covered, lam_mix)
    return PairDraws(cut, lam, np.stack([top, bottom, left, right], 1))


@dataclass(frozen=True)
class BatchMixing:
    """Mixes a process's share of a step's global batch; inactive when both alphas are 0."""

    num_classes: int
    seed: int
    mixup: float = 0.0  # Beta(mixup, mixup)'s alpha; 0: off
    cutmix: float = 0.0  # Beta(cutmix, cutmix)'s alpha; 0: off
    switch_prob: float = 0.5  # with both on, the chance that a pair is cut-mixed

    @property
    def active(self) -> bool:
        return self.mixup > 0 or self.cutmix > 0

    def __call__(
        self, images: torch.Tensor, labels: torch.Tensor, step: int, offset: int, global_batch: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(mixed images in their dtype, targets as (B, classes) float32 probabilities) of
        ``images``, the global positions [offset, offset + B) of the batch of step ``step`` (the
        step being trained, 1-based: any numbering works that every process and a resume share).
        """
        batch, height, width = len(images), images.shape[-2], images.shape[-1]
        if batch % 2 or offset % 2:
            raise ValueError(f"pairs need an even batch and offset, got {batch} at {offset}")
        if offset < 0 or offset + batch > global_batch:
            raise ValueError(
                f"positions [{offset}, {offset + batch}) outside a {global_batch} batch"
            )
        draws = pair_draws(
            self.seed, step, global_batch // 2, height, width,
            mixup=self.mixup, cutmix=self.cutmix, switch_prob=self.switch_prob,
        )  # fmt: skip
        mine = slice(offset // 2, (offset + batch) // 2)
        # one host-to-device copy of [cut, lam, top, bottom, left, right] per image (exact in
        # fp32), repeated for the pair's two images on the host, where it cannot sync the device
        packed = np.column_stack([draws.cutmix[mine], draws.lam[mine], draws.box[mine]])
        packed = torch.from_numpy(np.repeat(packed, 2, axis=0).astype(np.float32))
        cut, lam, box = to_device(packed, images.device).split([1, 1, 4], 1)  # (B,1) (B,1) (B,4)
        rows = torch.arange(height, device=images.device, dtype=torch.float32)[None, :, None]
        cols = torch.arange(width, device=images.device, dtype=torch.float32)[None, None, :]
        top, bottom, left, right = (box[:, i, None, None] for i in range(4))  # each (B, 1, 1)
        inside = (rows >= top) & (rows < bottom) & (cols >= left) & (cols < right)  # (B, H, W)
        # an image's own share: lam everywhere (mixup), or 1 outside the box and 0 inside (cutmix)
        own = torch.where(cut[:, :, None] > 0, (~inside).float(), lam[:, :, None])[:, None]
        partner = torch.arange(batch, device=images.device) ^ 1
        # in fp32 at least (a bf16 lam would drift from the target's), then back to the dtype
        mixed = (images * own + images[partner] * (1 - own)).to(images.dtype)
        one_hot = F.one_hot(labels.long(), self.num_classes).float()
        targets = lam * one_hot + (1 - lam) * one_hot[partner]
        return mixed, targets
