"""Colour fixes: give the SR output the colours of its (upsampled) input. Pure functions on batches
(B, C, H, W) of the same size and the same range ([0, 1] in the pipeline; any common range works)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from osediff_lab.errors import ConfigError


def channel_stats(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-image, per-channel mean and (population) std, shaped (B, C, 1, 1)."""
    return x.mean(dim=(-2, -1), keepdim=True), x.std(dim=(-2, -1), keepdim=True, unbiased=False)


def adain_color_fix(target: torch.Tensor, source: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """``target`` renormalised to the per-channel mean and std of ``source`` (not clamped)."""
    t_mean, t_std = channel_stats(target)
    s_mean, s_std = channel_stats(source)
    return (target - t_mean) / t_std.clamp_min(eps) * s_std + s_mean


def wavelet_blur(x: torch.Tensor, dilation: int) -> torch.Tensor:
    """One level of the a-trous wavelet: the 3x3 binomial blur (1/4, 1/2, 1/4 per axis) with holes of
    ``dilation``, edges replicated; separable, as shifted sums (much faster than a dilated conv on CPU)."""
    d = dilation
    x = F.pad(x, (d, d, d, d), mode="replicate")
    x = 0.25 * x[..., : -2 * d, :] + 0.5 * x[..., d:-d, :] + 0.25 * x[..., 2 * d :, :]
    return 0.25 * x[..., : -2 * d] + 0.5 * x[..., d:-d] + 0.25 * x[..., 2 * d :]


def wavelet_split(x: torch.Tensor, levels: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(high, low) with high + low == x: ``levels`` detail bands summed, and the residual low-pass."""
    low = x
    high = torch.zeros_like(x)
    for level in range(levels):
        blurred = wavelet_blur(low, 2**level)
        high = high + (low - blurred)
        low = blurred
    return high, low


def wavelet_color_fix(target: torch.Tensor, source: torch.Tensor, levels: int = 5) -> torch.Tensor:
    """Detail of ``target`` over the low frequencies (colour, shading) of ``source`` (not clamped)."""
    high, _ = wavelet_split(target, levels)
    _, low = wavelet_split(source, levels)
    return high + low


def no_color_fix(target: torch.Tensor, source: torch.Tensor, wavelet_levels: int) -> torch.Tensor:
    """``target`` unchanged (``pipeline.color_fix=none``)."""
    return target


def adain_fix(target: torch.Tensor, source: torch.Tensor, wavelet_levels: int) -> torch.Tensor:
    """``adain_color_fix`` in the registry's signature (it has no levels)."""
    return adain_color_fix(target, source)


# pipeline.color_fix -> fn(target, source, wavelet_levels); a new fix is one entry here.
COLOR_FIXES: dict[str, Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]] = {
    "adain": adain_fix,
    "wavelet": wavelet_color_fix,
    "none": no_color_fix,
}


def color_fix(name: str, target: torch.Tensor, source: torch.Tensor, wavelet_levels: int) -> torch.Tensor:
    """The fix ``COLOR_FIXES[name]`` (``pipeline.color_fix``) of ``target`` towards ``source``, both the same range."""
    fix = COLOR_FIXES.get(name)
    if fix is None:
        raise ConfigError(f"pipeline.color_fix='{name}' must be one of {sorted(COLOR_FIXES)}")
    return fix(target, source, wavelet_levels)
