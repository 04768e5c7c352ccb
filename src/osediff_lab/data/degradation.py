"""Degradations that turn HQ training crops into LQ inputs, batched on the batch's device."""

from __future__ import annotations

from typing import Protocol

import torch
from omegaconf import DictConfig

from osediff_lab.build import build
from osediff_lab.data.resize import resize
from osediff_lab.errors import ConfigError


class Degradation(Protocol):
    """HQ batch in [-1, 1], shape (B, 3, H, W) -> LQ batch in [-1, 1], shape (B, 3, H/scale, W/scale); the HQ is
    left as it is. One that changes the HQ side too (Real-ESRGAN's pair pool) also has ``pair(hq) -> (hq, lq)``."""

    scale: int

    def __call__(self, hq: torch.Tensor) -> torch.Tensor: ...


def degrade_pair(degradation: Degradation, hq: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(HQ, LQ) in [-1, 1] for a training batch ``hq`` in [-1, 1]: the degradation's ``pair`` where it has one,
    else ``hq`` and its LQ."""
    pair = getattr(degradation, "pair", None)
    return pair(hq) if pair is not None else (hq, degradation(hq))


class BicubicDegradation:
    """Plain bicubic downsampling by ``scale`` (with antialiasing), as in classic SR benchmarks."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def __call__(self, hq: torch.Tensor) -> torch.Tensor:
        h, w = hq.shape[-2:]
        if h % self.scale or w % self.scale:
            raise ValueError(f"HQ size {h}x{w} is not divisible by scale {self.scale}")
        return resize(hq, (h // self.scale, w // self.scale), "bicubic").clamp(-1, 1)


class PairedOnly:
    """For paired data: batches must already carry their LQ; reaching this is an error."""

    def __init__(self, scale: int) -> None:
        self.scale = scale

    def __call__(self, hq: torch.Tensor) -> torch.Tensor:
        raise ConfigError("degradation=none needs paired data whose batches carry 'lq'; this dataset gives HQ only")


def build_degradation(cfg: DictConfig, scale: int) -> Degradation:
    """The degradation ``cfg._target_`` names (``degradation=realesrgan|bicubic|none`` or any importable class),
    built with the group's keys and the run's ``scale``."""
    return build(cfg, "degradation", scale=scale)
