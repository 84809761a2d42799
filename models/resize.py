"""Loading our own checkpoints' weights at any ``img_size``.

The position embedding is resized as for Google's files, so a model fine-tuned at 224 px can be
evaluated or tuned further at 384 px. The files themselves are read by ``utils.training.run_files``.
"""

from __future__ import annotations

import logging

import torch

from models.lora import is_lora
from models.npz_io import CheckpointError, describe_keys, resize_pos_embed

log = logging.getLogger(__name__)
POSEMB = "transformer.embeddings.position_embeddings"


def load_resized(
    model: torch.nn.Module, state_dict: dict[str, torch.Tensor], keep_head: bool = True
) -> None:
    """``load_state_dict`` (strict) after fitting the position embedding to ``model``'s grid.

    With ``keep_head=False`` a head of another class count is left as initialised (zeros for
    ``zero_head=True``), as when fine-tuning on a new data set.
    """
    state = dict(state_dict)
    # LoRA's adapters are not part of the format: they keep what they are (B = 0, a no-op)
    own = {k: v for k, v in model.state_dict().items() if not is_lora(k)}
    if POSEMB in state and POSEMB in own and state[POSEMB].shape != own[POSEMB].shape:
        old, new = state[POSEMB], own[POSEMB]
        if old.shape[-1] == new.shape[-1]:
            log.info("resizing position embedding %s -> %s", tuple(old.shape), tuple(new.shape))
            grid = model.transformer.embeddings.grid_size
            state[POSEMB] = torch.from_numpy(resize_pos_embed(old.float().numpy(), grid))
    if not keep_head:
        for key in ("head.weight", "head.bias"):
            if key in state and key in own and state[key].shape != own[key].shape:
                state[key] = own[key]
    mismatched = [
        f"{k} {tuple(v.shape)} != expected {tuple(own[k].shape)}"
        for k, v in state.items()
        if k in own and v.shape != own[k].shape
    ]
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    if mismatched or missing or unexpected:
        parts = []
        for label, keys in (
            ("mismatched", mismatched),
            ("missing", missing),
            ("unexpected", unexpected),
        ):
            if keys:
                parts.append(f"{len(keys)} {label}: {describe_keys(keys, 3)}")
        raise CheckpointError("checkpoint does not fit the model: " + "; ".join(parts))
    model.load_state_dict(state, strict=len(own) == len(model.state_dict()))
