"""The optimizer and its learning rate: SGD with momentum 0.9 (Google's fine-tuning recipe) or
AdamW, optionally with layer-wise learning-rate decay; linear warm-up, then cosine or linear decay
to zero.

The rate is a pure function of the update, ``LearningRate.at(k)``, set on the optimizer before
each update as nanoGPT's loop does: nothing else holds it, so a resume needs only the step. The
formulas are the reference's (``WarmupCosineSchedule``, ``WarmupLinearSchedule``), indexed as
Google's ``create_learning_rate_schedule`` is: update ``k`` (counted from 1) runs at
``peak * factor(k)``, so the first update is already warm and the last one reaches zero.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import torch


def warmup_cosine(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


def warmup_linear(step: int, warmup_steps: int, total_steps: int) -> float:
    if step < warmup_steps:
        return step / max(1, warmup_steps)
    return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))


SCHEDULES = {"cosine": warmup_cosine, "linear": warmup_linear}


@dataclass(frozen=True)
class LearningRate:
    """The learning rate of every update of a run.

    ``ends`` holds the last update of each schedule: ``(num_steps,)`` for a run, and one more for
    each time a finished run is trained further (``--resume`` with a larger ``--num_steps``),
    whose added updates warm up again and decay to zero at their own end.
    """

    peak: float
    warmup_steps: int
    decay: str  # a key of SCHEDULES
    ends: tuple[int, ...]

    @classmethod
    def of_run(
        cls, peak: float, warmup_steps: int, decay: str, num_steps: int, saved_ends: list[int]
    ) -> LearningRate:
        """The schedule of a run of ``num_steps``; ``saved_ends``, a resumed state's, gain a
        segment when the run goes on past their last end."""
        ends = tuple(saved_ends) or (num_steps,)
        return cls(peak, warmup_steps, decay, ends if num_steps == ends[-1] else (*ends, num_steps))

    def at(self, update: int) -> float:
        """The rate of optimizer update ``update`` (from 1)."""
        starts = (0, *self.ends[:-1])
        start, end = next(
            ((s, e) for s, e in zip(starts, self.ends, strict=True) if update <= e),
            (starts[-1], self.ends[-1]),
        )
        return self.peak * SCHEDULES[self.decay](update - start, self.warmup_steps, end - start)


OPTIMIZERS = ("sgd", "adamw")
STATE_VALUES = {"sgd": 1, "adamw": 2}  # float32 values per parameter: momentum; two moments

# Where each parameter sits in the network, by name, for both families: the embeddings (a ViT's
# patch and position embeddings, class token and hybrid ResNet stem; a Mixer's stem) are layer 0,
# block i is layer i + 1, and everything else (the final norm, pre-logits and head) the top.
_EMBEDDINGS = re.compile(r"(?:transformer\.embeddings|stem)\.")
_BLOCK = re.compile(r"(?:transformer\.encoder\.layer|blocks)\.(\d+)\.")
# Not decayed by AdamW besides 1-D parameters (biases, norms): what timm's
# ``no_weight_decay()`` and BEiT/MAE name ``pos_embed`` and ``cls_token``.
_NO_DECAY = ("transformer.embeddings.position_embeddings", "transformer.embeddings.cls_token")


def build_optimizer(
    model: torch.nn.Module,
    weight_decay: float,
    fp16: bool,
    name: str = "sgd",
    layer_decay: float | None = None,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimizer of ``--optimizer`` over the parameters that train; its rate is set before
    each update (``set_learning_rate``).

    ``sgd``: momentum 0.9 and coupled weight decay on every parameter, as Google's recipe and
    this program always did; without ``layer_decay`` it is today's single group, bit for bit.
    ``adamw``: decoupled weight decay, none on biases, norms, the position embedding and the
    class token (as timm and BEiT/MAE do). ``layer_decay`` D scales each group's rate by
    ``lr_scale`` = D^(depth - layer) (``param_groups``); it changes no weight decay, so that
    ``--layer_decay 1`` trains as without it.
    """
    if name not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {name!r}; choose one of: {', '.join(OPTIMIZERS)}")
    groups = param_groups(model, layer_decay, exempt_from_decay=name == "adamw")
    if name == "sgd":
        # One kernel for all parameters, except under fp16: a fused SGD whose first step the
        # loss scaler skips keeps uninitialised momentum buffers (torch 2.14, CPU and CUDA).
        return torch.optim.SGD(
            groups, lr=0.0, momentum=0.9, weight_decay=weight_decay, fused=not fp16
        )
    # A fused AdamW starts from zeroed moments and takes back the step count of a skipped
    # step, so it stays fused under fp16 too.
    return torch.optim.AdamW(groups, lr=0.0, betas=betas, weight_decay=weight_decay, fused=True)


def param_groups(
    model: torch.nn.Module, layer_decay: float | None, exempt_from_decay: bool
) -> list[dict[str, Any]]:
    """The trainable parameters of ``model`` (a bare ViT, hybrid or Mixer, not a DDP or compiled
    wrapper: the names matter) in groups, in the order they are first met.

    Without ``layer_decay`` or exemptions: one group of every parameter, as today. With
    ``layer_decay`` D: one group per layer, holding ``layer`` (0: the embeddings, i + 1: block i,
    depth: the final norm and head, as BEiT and MAE count; timm puts the final norm with the
    last block instead) and ``lr_scale`` = D^(depth - layer). With ``exempt_from_decay``, the
    parameters that take no weight decay get groups of their own with ``weight_decay`` 0.
    """
    named = list(model.named_parameters())
    depth = top_layer(model)
    groups: dict[tuple[int | None, bool], dict[str, Any]] = {}
    for name, param in named:
        if not param.requires_grad:
            continue
        layer = None if layer_decay is None else layer_of(name, depth)
        decays = not (exempt_from_decay and (param.ndim <= 1 or name in _NO_DECAY))
        if (layer, decays) not in groups:
            group: dict[str, Any] = {"params": []}
            if layer is not None:
                group |= {"layer": layer, "lr_scale": layer_decay ** (depth - layer)}
            if not decays:
                group["weight_decay"] = 0.0
            groups[layer, decays] = group
        groups[layer, decays]["params"].append(param)
    return list(groups.values())


def top_layer(model: torch.nn.Module) -> int:
    """The layer of the final norm and the head: 1 + the number of blocks."""
    blocks = (int(m[1]) + 1 for n, _ in model.named_parameters() if (m := _BLOCK.match(n)))
    return 1 + max(blocks, default=0)


def layer_of(name: str, depth: int) -> int:
    """The layer of parameter ``name``: 0 for the embeddings, i + 1 for block i, else ``depth``."""
    if _EMBEDDINGS.match(name):
        return 0
    if block := _BLOCK.match(name):
        return int(block[1]) + 1
    return depth


def set_learning_rate(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Each group runs at ``lr`` times its ``lr_scale``; without layer decay there is none, and
    ``lr`` itself is set (``lr * 1.0 == lr``, so SGD's updates stay as they were)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)


def group_rates(optimizer: torch.optim.Optimizer) -> dict[str, float]:
    """The rates of the top layer's group (the head's) and of the lowest layer's (the
    embeddings' under layer decay), for TensorBoard; equal without layer decay."""
    by_layer = sorted(optimizer.param_groups, key=lambda group: group.get("layer", 0))
    return {"head": by_layer[-1]["lr"], "lowest": by_layer[0]["lr"]}
