"""loralib-style LoRA linears (``lora_A`` / ``lora_B`` stored beside the base weight), as DAPE saves them.

The names and shapes must match the released DAPE checkpoint, so these are plain ``nn.Linear`` subclasses
rather than peft adapters (peft nests the base layer and renames every tensor).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class LoRALinear(nn.Linear):
    """``y = W x + b + (B A x) * alpha / r``; ``A`` is [r, in], ``B`` is [out, r] and starts at zero."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float = 1.0, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias=bias)
        self.rank = rank
        self.scaling = alpha / rank
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, device=self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling


class MergedLoRALinear(nn.Linear):
    """A fused projection (e.g. qkv) whose equal output slices get LoRA only where ``enabled`` says.

    ``lora_A`` is [r * n_enabled, in] and ``lora_B`` is [out / n_slices * n_enabled, r]: slice ``i`` of the
    enabled ones uses rows ``i*r:(i+1)*r`` of A and the ``i``-th block of B (loralib's grouped layout).
    """

    def __init__(
        self, in_features: int, out_features: int, rank: int, enabled: tuple[bool, ...], alpha: float = 1.0, bias: bool = True
    ) -> None:
        super().__init__(in_features, out_features, bias=bias)
        if out_features % len(enabled):
            raise ValueError(f"out_features {out_features} is not divisible into {len(enabled)} slices")
        self.rank = rank
        self.scaling = alpha / rank
        self.enabled = tuple(bool(e) for e in enabled)
        self.slice_size = out_features // len(enabled)
        n = sum(self.enabled)
        self.lora_A = nn.Parameter(torch.empty(rank * n, in_features, device=self.weight.device))
        self.lora_B = nn.Parameter(torch.zeros(self.slice_size * n, rank, device=self.weight.device))
        nn.init.kaiming_uniform_(self.lora_A, a=5**0.5)

    def delta(self, x: torch.Tensor) -> torch.Tensor:
        """The LoRA update for every output slice (zeros for disabled slices), shape [..., out]."""
        low = F.linear(x, self.lora_A)  # [..., r * n]
        parts = []
        group = 0
        for on in self.enabled:
            if on:
                a = low[..., group * self.rank : (group + 1) * self.rank]
                b = self.lora_B[group * self.slice_size : (group + 1) * self.slice_size]
                parts.append(F.linear(a, b))
                group += 1
            else:
                parts.append(low.new_zeros(*low.shape[:-1], self.slice_size))
        return torch.cat(parts, dim=-1) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + self.delta(x)
