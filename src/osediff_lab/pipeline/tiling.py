"""Tiling: latent tiles with gaussian-weighted blending (for the UNet) and the VAE's own tiling.

A tile at least as large as the input means one call on the whole input: exactly the untiled result.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import AutoencoderKL

from osediff_lab.models.backbone import vae_factor


def tile_starts(length: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of tiles of size ``tile`` covering ``length`` with at least ``overlap`` shared;
    the last tile is flush with the end. One tile at 0 when ``length <= tile``."""
    if tile <= overlap or overlap < 0:
        raise ValueError(f"tile size {tile} must exceed overlap {overlap} >= 0")
    if length <= tile:
        return [0]
    starts = list(range(0, length - tile, tile - overlap))
    return starts + [length - tile]


def gaussian_weights(height: int, width: int, sigma: float) -> torch.Tensor:
    """Separable gaussian bump of shape (height, width), peak 1 at the centre, std ``sigma`` x the side."""

    def bump(n: int) -> torch.Tensor:
        x = torch.arange(n, dtype=torch.float64) - (n - 1) / 2
        return torch.exp(-0.5 * (x / (sigma * n)) ** 2)

    return (bump(height)[:, None] * bump(width)[None, :]).float()


def tiled_apply(
    fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile: int, overlap: int, sigma: float
) -> torch.Tensor:
    """``fn`` (a shape-preserving map on (B, C, h, w) latents) applied tile by tile over ``z``,
    overlapping tiles blended with gaussian weights (accumulated in fp32)."""
    height, width = z.shape[-2:]
    if height <= tile and width <= tile:
        return fn(z)
    th, tw = min(tile, height), min(tile, width)
    weight = gaussian_weights(th, tw, sigma).to(z.device)
    total = torch.zeros(z.shape[0], z.shape[1], height, width, device=z.device, dtype=torch.float32)
    norm = torch.zeros(height, width, device=z.device, dtype=torch.float32)
    for y in tile_starts(height, tile, overlap):
        for x in tile_starts(width, tile, overlap):
            out = fn(z[..., y : y + th, x : x + tw])
            total[..., y : y + th, x : x + tw] += out.float() * weight
            norm[y : y + th, x : x + tw] += weight
    return (total / norm).to(z.dtype)


def set_vae_tiling(vae: AutoencoderKL, latent_tile: int, overlap: float) -> None:
    """Turn on diffusers' VAE tiling with tiles of ``latent_tile`` latent px (x the VAE factor in image px).

    diffusers tiles only inputs larger than the tile, so smaller images run untiled. Encoder and
    decoder use different sizes by calling this before each.
    """
    if latent_tile < 1 or not 0 <= overlap < 1:
        raise ValueError(f"VAE tile {latent_tile} must be >= 1 latent px and overlap {overlap} in [0, 1)")
    vae.use_tiling = True
    vae.tile_latent_min_size = latent_tile
    vae.tile_sample_min_size = latent_tile * vae_factor(vae)
    vae.tile_overlap_factor = overlap
