"""One optimizer update from micro-batches: what every process runs, step after step."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext

import torch
import torch.nn.functional as F

from utils.training.precision import Precision


def train_step(
    model,
    batch,
    optimizer,
    scaler,
    precision: Precision,
    accum: int,
    max_norm: float,
    stop_now: Callable[[], bool] | None = None,
    label_smoothing: float = 0.0,
):
    """One optimizer update from ``accum`` equal micro-batches; returns (mean loss, grad norm),
    or None when ``stop_now()``, asked between micro-batches, says to stop: the step is then
    abandoned, its gradients dropped and nothing applied, so that a stop waits for one
    micro-batch at most, not for a whole step.

    Labels are class indices, or class probabilities (``(B, classes)``, from ``--mixup`` or
    ``--cutmix``). With ``label_smoothing`` or probabilities the loss is ``cross_entropy``'s on the
    model's logits; otherwise the model's own (the reference's ``model(x, labels)``), as before.

    Gradients are all-reduced only on the last micro-batch (``no_sync`` of DDP, also through
    torch.compile's wrapper). Nothing here waits for the device: the returned values are
    tensors, read when the log needs them.
    """
    images, labels = batch
    total = torch.zeros((), device=images.device)
    no_sync = getattr(model, "no_sync", None)  # DDP's, compiled or not; a bare model has none
    for i, (x, y) in enumerate(zip(images.chunk(accum), labels.chunk(accum), strict=True)):
        if i and stop_now is not None and stop_now():
            optimizer.zero_grad(set_to_none=True)
            return None
        last = i == accum - 1
        with nullcontext() if last or no_sync is None else no_sync():
            with precision.autocast():
                if label_smoothing or y.is_floating_point():  # smoothed or mixed targets
                    logits = model(x)[0]
                    loss = F.cross_entropy(logits, y, label_smoothing=label_smoothing) / accum
                else:
                    loss = model(x, y) / accum
            scaler.scale(loss).backward()
        total += loss.detach()
    scaler.unscale_(optimizer)
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    scaler.step(optimizer)  # skipped, under fp16, when a gradient is inf or NaN
    scaler.update(precision.static_scale)  # None: grow or back off dynamically
    optimizer.zero_grad(set_to_none=True)
    return total, grad_norm
