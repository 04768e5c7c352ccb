"""Exponential moving average of named tensors (training's EMA callback and ``pretrain`` share it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping
from typing import Any

import torch


class EMA:
    """shadow <- d * shadow + (1 - d) * value at each ``update``, with d = min(decay, (1 + n) / (warmup + n)) at
    the n-th update when ``warmup`` > 1 (10: timm's and ``pretrain``'s warm-up), else d = decay. Non-float
    tensors are copied. ``device``: where the shadow lives (``cpu`` keeps it off the GPU); None: beside each tensor."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], decay: float, warmup: int = 0,
                 device: str | torch.device | None = None) -> None:
        if not 0 <= decay <= 1:
            raise ValueError(f"EMA decay={decay} must be in [0, 1]")
        self.decay, self.warmup, self.device = float(decay), int(warmup), device
        self.shadow = {k: v.detach().to(device or v.device, copy=True) for k, v in tensors.items()}
        self.updates = 0

    def current_decay(self) -> float:
        """The decay the next update uses."""
        n = self.updates + 1
        return min(self.decay, (1 + n) / (self.warmup + n)) if self.warmup > 1 else self.decay

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Move the shadow towards ``tensors`` (the same names)."""
        d = self.current_decay()
        for k, v in tensors.items():
            shadow = self.shadow[k]
            if shadow.dtype.is_floating_point:
                shadow.lerp_(v.detach().to(shadow.device, shadow.dtype), 1 - d)
            else:
                shadow.copy_(v)
        self.updates += 1

    @contextlib.contextmanager
    def swapped(self, tensors: Mapping[str, torch.Tensor]) -> Iterator[None]:
        """Inside, ``tensors`` (live parameters, the same names) hold the shadow values; restored after."""
        saved = {k: v.detach().clone() for k, v in tensors.items()}
        with torch.no_grad():
            for k, v in tensors.items():
                v.copy_(self.shadow[k])
        try:
            yield
        finally:
            with torch.no_grad():
                for k, v in tensors.items():
                    v.copy_(saved[k])

    def state_dict(self) -> dict[str, Any]:
        return {"shadow": {k: v.detach().cpu() for k, v in self.shadow.items()}, "updates": self.updates,
                "decay": self.decay, "warmup": self.warmup}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Restore a saved shadow (same names and shapes) and update count, onto the shadow's current devices."""
        missing = sorted(set(self.shadow) ^ set(state["shadow"]))
        if missing:
            raise RuntimeError(f"EMA state does not match the trained tensors: {len(missing)} names differ (e.g. {missing[:3]})")
        for k, v in state["shadow"].items():
            self.shadow[k] = v.to(self.shadow[k].device, self.shadow[k].dtype)
        self.updates = int(state["updates"])
