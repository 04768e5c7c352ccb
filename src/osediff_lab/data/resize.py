"""Resizing image batches (any range): the one resize of degradations, the generator's input and the pipeline."""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
    return upsample_input(lq, size, ["bicubic"])


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
