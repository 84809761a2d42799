"""Training precision: one code path for fp32, fp16 and bf16 (torch.amp, no apex)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Precision:
    """One code path for every precision: an autocast that may be a no-op, a scaler that may be."""

    name: str
    device: torch.device
    loss_scale: float

    @property
    def dtype(self) -> torch.dtype | None:
        return {"fp16": torch.float16, "bf16": torch.bfloat16}.get(self.name)

    def autocast(self):
        enabled = self.dtype is not None
        return torch.autocast(self.device.type, dtype=self.dtype, enabled=enabled)

    @property
    def static_scale(self) -> float | None:
        """The fixed fp16 loss scale (``--loss_scale`` > 0), or None for dynamic scaling."""
        return self.loss_scale if self.loss_scale > 0 else None

    def scaler(self) -> torch.amp.GradScaler:
        return torch.amp.GradScaler(
            self.device.type,
            enabled=self.name == "fp16",
            init_scale=self.static_scale or 2.0**16,
        )
