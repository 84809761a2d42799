"""The evaluation pass: every process scores its share, the totals are exact over all of them."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from utils.runtime import distributed as dist
from utils.training.precision import Precision


class Scores(NamedTuple):
    """One evaluation: totals over all processes, and a few of this process's images."""

    accuracy: float
    top5_accuracy: float  # the label among the 5 highest logits (all of them below 5 classes)
    loss: float
    count: int
    confusion: np.ndarray  # (classes, classes): [true class, predicted class]
    samples: tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # images, preds, labels (CPU)


@torch.no_grad()
def evaluate(
    model, loader, device: torch.device, precision: Precision, num_classes: int, keep: int = 16
) -> Scores:
    """Top-1 and top-5 accuracy, mean loss and confusion matrix over the whole set, each process
    scoring its own share; and the first ``keep`` images of this process's share, for a figure.
    The model is left in the mode it came in."""
    was_training = model.training
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, top-5 hits, loss sum
    k = min(5, num_classes)
    count = 0  # counted on the host, so that no batch waits for the device
    confusion = torch.zeros(num_classes * num_classes, dtype=torch.int64, device=device)
    kept: list[tuple[torch.Tensor, ...]] = []
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x)[0].float()
        pred = logits.argmax(-1)
        correct = (pred == y).sum()
        top5 = (logits.topk(k, dim=-1).indices == y[:, None]).any(-1).sum()  # (B, k) vs (B, 1)
        loss = F.cross_entropy(logits, y, reduction="sum")
        totals += torch.stack((correct.double(), top5.double(), loss.double()))
        count += len(y)
        cells = y * num_classes + pred  # (bincount on CUDA would read its max back)
        confusion.scatter_add_(0, cells, torch.ones_like(cells))
        if sum(len(k[0]) for k in kept) < keep:
            kept.append((x[:keep].cpu(), pred[:keep].cpu(), y[:keep].cpu()))
    model.train(was_training)
    totals = torch.cat((totals, totals.new_tensor([count])))
    correct, top5, loss, count = dist.all_reduce_sum(totals).tolist()
    confusion = dist.all_reduce_sum(confusion).view(num_classes, num_classes).cpu().numpy()
    samples = tuple(torch.cat(parts)[:keep] for parts in zip(*kept, strict=True))
    return Scores(correct / count, top5 / count, loss / count, int(count), confusion, samples)
