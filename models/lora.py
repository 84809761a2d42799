"""LoRA (Hu et al., 2021): low-rank adapters beside a model's frozen linear layers.

Our ViT keeps the reference's separate ``query``/``key``/``value``/``out`` layers (timm fuses q, k
and v into one, which is why LoRA on timm's ViT needs surgery), so an adapter replaces a layer
in place and keeps its ``weight`` and ``bias``: a Google ``.npz`` or one of our checkpoints loads
into the adapted model unchanged, and ``merged_state_dict`` gives back the plain format. The
attention runs query, key and value as one matrix product; ``Attention._project`` adds each
adapter's ``delta`` to its own slice of that product.
"""

from __future__ import annotations

import math
import re

import torch
import torch.nn.functional as F
from torch import nn

from models.configs import is_mixer
from models.errors import UsageError

LORA_TARGETS = ("attn", "mlp", "attn+mlp")
_ATTENTION = re.compile(r"transformer\.encoder\.layer\.\d+\.attn\.(query|key|value|out)$")
_VIT_MLP = re.compile(r"transformer\.encoder\.layer\.\d+\.ffn\.fc[12]$")
_MIXER_MLP = re.compile(r"blocks\.\d+\.\w+\.fc[12]$")
_ADAPTER = re.compile(r"(^|\.)lora_[AB]$")


class LoRALinear(nn.Linear):
    """A linear layer plus ``scaling * B A``, with ``B`` zero at first so that the layer computes
    what it computed before.

    The adapter is a branch of its own, ``x A^T B^T``: the frozen weight's d x d gradient is never
    formed, which an effective weight ``W + s B A`` (or ``torch.nn.utils.parametrize``) would
    compute in every backward pass.
    """

    def __init__(self, linear: nn.Linear, rank: int, alpha: float) -> None:
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias  # the same parameters, same names
        self.scaling = alpha / rank
        like = {"device": linear.weight.device, "dtype": linear.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, **like))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, **like))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # nn.Linear's and PEFT's

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter's share of the output."""
        return F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.delta(x)

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """The weight of the plain layer that computes what this one does, summed in float32 at
        least so that a bfloat16 weight rounds once."""
        dtype = torch.promote_types(self.weight.dtype, torch.float32)
        delta = (self.lora_B.to(dtype) @ self.lora_A.to(dtype)) * self.scaling
        return (self.weight.to(dtype) + delta).to(self.weight.dtype)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, rank={self.lora_A.shape[0]}, scaling={self.scaling:g}"


def is_lora(name: str) -> bool:
    """Whether a parameter or state_dict key is an adapter's."""
    return bool(_ADAPTER.search(name))


def add_lora(model: nn.Module, rank: int, alpha: float, targets: str = "attn") -> int:
    """Put adapters of ``rank`` on ``targets`` (``LORA_TARGETS``) of a ViT, hybrid or Mixer, in
    place; the number of layers adapted."""
    if targets not in LORA_TARGETS:
        raise UsageError(f"--lora_targets {targets!r} is none of {', '.join(LORA_TARGETS)}")
    mixer = is_mixer(model.config)
    if mixer and "attn" in targets:
        raise UsageError("a Mixer has no attention: pass --lora_targets mlp")
    if rank < 1:
        raise UsageError(f"--lora_rank must be at least 1, got {rank}")
    if not alpha > 0:
        raise UsageError(f"--lora_alpha must be positive, got {alpha}")
    if any(isinstance(module, LoRALinear) for module in model.modules()):
        raise UsageError("the model has adapters already: add_lora once, on the plain model")
    mlp = _MIXER_MLP if mixer else _VIT_MLP
    patterns = [p for t, p in (("attn", _ATTENTION), ("mlp", mlp)) if t in targets]
    chosen = [
        (name, module)
        for name, module in model.named_modules()
        if type(module) is nn.Linear and any(p.search(name) for p in patterns)
    ]
    if not chosen:
        raise UsageError(f"--lora_targets {targets}: the model has no such layers")
    narrowest = min(min(m.in_features, m.out_features) for _, m in chosen)
    if rank > narrowest:
        raise UsageError(
            f"--lora_rank {rank} exceeds the {narrowest} features of the narrowest adapted layer: "
            f"pass --lora_rank {narrowest} or less"
        )
    for name, module in chosen:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, LoRALinear(module, rank, alpha))
    return len(chosen)


def merged_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model``'s weights in the plain format: adapters merged into their layers' weights, their
    own keys gone; a model without adapters gives its ``state_dict``."""
    state = model.state_dict()
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            prefix = f"{name}." if name else ""
            state[f"{prefix}weight"] = module.merged_weight()
    return {k: v for k, v in state.items() if not is_lora(k)}
