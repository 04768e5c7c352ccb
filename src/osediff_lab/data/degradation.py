"""Degradations that turn HQ training crops into LQ inputs, batched on the batch's device."""

from __future__ import annotations

from typing import Protocol

import torch
import torch.nn.functional as F
from omegaconf import DictConfig

from osediff_lab.errors import ConfigError


class Degradation(Protocol):
    """HQ batch in [-1, 1], shape (B, 3, H, W) -> LQ batch in [-1, 1], shape (B, 3, H/scale, W/scale)."""

    scale: int

    def __call__(self, hq: torch.Tensor) -> torch.Tensor: ...


def resize(x: torch.Tensor, size: tuple[int, int], mode: str = "bicubic", antialias: bool | None = None) -> torch.Tensor:
    """Resize images (any range); bicubic/bilinear/area. ``antialias`` None = antialias when shrinking."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    if mode == "area":
        return F.interpolate(x, size=size, mode="area")
    if antialias is None:
        antialias = size[0] < x.shape[-2] or size[1] < x.shape[-1]
    return F.interpolate(x, size=size, mode=mode, align_corners=False, antialias=antialias)


def upsample_to(lq: torch.Tensor, size) -> torch.Tensor:
    """Bicubic upsampling of an LQ batch in [-1, 1] to ``size`` (the generator's x_L), clamped to [-1, 1]."""
    return resize(lq, tuple(size), "bicubic").clamp(-1, 1)


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
    """The degradation named by ``cfg.name``."""
    if cfg.name == "bicubic":
        return BicubicDegradation(scale)
    if cfg.name == "none":
        return PairedOnly(scale)
    if cfg.name == "realesrgan":
        from osediff_lab.data.realesrgan import RealESRGANDegradation  # imports this module: import late

        return RealESRGANDegradation(cfg, scale)
    raise ConfigError(f"degradation.name '{cfg.name}' is unknown; choose degradation=realesrgan, bicubic or none")


def upsample_input(lq: torch.Tensor, size, modes: list[str], quantize_8bit: bool = False) -> torch.Tensor:
    """The generator's x_L: an LQ batch in [-1, 1] resized to ``size`` with one mode drawn uniformly from
    ``modes`` (global torch RNG; nothing is drawn when there is one mode), optionally rounded to 8 bits as
    a saved image would be. ``[bicubic]`` without rounding is ``upsample_to``; the public release uses
    ``[area, bilinear, bicubic]`` with rounding."""
    mode = modes[0] if len(modes) == 1 else modes[int(torch.randint(len(modes), (1,)))]
    x = resize(lq, tuple(size), mode).clamp(-1, 1)
    if quantize_8bit:
        x = ((x + 1) * 127.5).round() / 127.5 - 1
    return x
