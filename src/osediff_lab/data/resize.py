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


def resize_by_factor(x: torch.Tensor, factor: float, mode: str = "bicubic", antialias: bool = False) -> torch.Tensor:
    """Resize images (any range) as ``F.interpolate(x, scale_factor=factor)`` does (the public releases' first
    degradation stage): output floor(size * factor), output pixel i sampled at input (i + 0.5) / factor - 0.5, so
    bilinear/bicubic content is stretched by floor(size * factor) / (size * factor) (area ignores the factor:
    the same as ``resize`` to that size)."""
    if factor == 1:
        return x
    if mode == "area":
        return F.interpolate(x, scale_factor=factor, mode="area")
    return F.interpolate(x, scale_factor=factor, mode=mode, align_corners=False, antialias=antialias)


def upsample_to(lq: torch.Tensor, size) -> torch.Tensor:
    """Bicubic upsampling of an LQ batch in [-1, 1] to ``size`` (the generator's x_L), clamped to [-1, 1]."""
    return upsample_input(lq, size, ["bicubic"])


def upsample_input(
    lq: torch.Tensor, size, modes: list[str], quantize_8bit: bool = False, per_sample: bool = False
) -> torch.Tensor:
    """The generator's x_L: an LQ batch in [-1, 1] resized to ``size`` with a mode drawn uniformly from ``modes``
    (global torch RNG; nothing is drawn when there is one mode), one for the batch or, ``per_sample``, one per
    sample (the public releases, whose datasets resize one image at a time), clamped to [-1, 1] and optionally
    rounded to 8 bits as a saved image would be. ``[bicubic]`` without rounding is ``upsample_to``; the public
    releases use ``[area, bilinear, bicubic]`` per sample with rounding."""
    draws = lq.shape[0] if per_sample else 1
    picks = [0] * draws if len(modes) == 1 else torch.randint(len(modes), (draws,)).tolist()
    if draws == 1:
        x = resize(lq, tuple(size), modes[picks[0]])
    else:
        x = lq.new_empty((*lq.shape[:-2], *size))
        for m in sorted(set(picks)):
            idx = [i for i, p in enumerate(picks) if p == m]
            x[idx] = resize(lq[idx], tuple(size), modes[m])
    x = x.clamp(-1, 1)
    if quantize_8bit:
        x = ((x + 1) * 127.5).round() / 127.5 - 1
    return x
