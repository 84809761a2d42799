"""The optimizer step and the evaluation pass: what every process runs, step after step."""

from __future__ import annotations

from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel as DDP

from utils import distributed as dist
from utils.precision import Precision


def train_step(model, batch, optimizer, scaler, precision: Precision, accum: int, max_norm: float):
    """One optimizer update from ``accum`` equal micro-batches; returns (mean loss, grad norm).

    Gradients are all-reduced only on the last micro-batch (``no_sync``). Nothing here waits for
    the device: the returned values are tensors, read when the log needs them.
    """
    images, labels = batch
    total = torch.zeros((), device=images.device)
    for i, (x, y) in enumerate(zip(images.chunk(accum), labels.chunk(accum), strict=True)):
        last = i == accum - 1
        with nullcontext() if last or not isinstance(model, DDP) else model.no_sync():
            with precision.autocast():
                loss = model(x, y) / accum
            scaler.scale(loss).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)  # skipped, under fp16, when a gradient is inf or NaN
    scaler.update(precision.static_scale)  # None: grow or back off dynamically
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm


@torch.no_grad()
def evaluate(model, loader, device: torch.device, precision: Precision) -> tuple[float, float, int]:
    """Accuracy and mean loss over the whole test set, each process scoring its own share."""
    model.eval()
    totals = torch.zeros(3, dtype=torch.float64, device=device)  # correct, loss sum, count
    for x, y in loader:
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with precision.autocast():
            logits = model(x)[0].float()
        correct = (logits.argmax(-1) == y).sum()
        loss = F.cross_entropy(logits, y, reduction="sum")
        totals += torch.stack(
            (correct.double(), loss.double(), torch.tensor(len(y), device=device))
        )
    model.train()
    correct, loss, count = dist.all_reduce_sum(totals).tolist()
    return correct / count, loss / count, int(count)
