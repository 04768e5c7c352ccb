"""The public releases' JPEG approximation, batched, one quality per sample (``degradation.jpeg_codec=release_diffjpeg``).

OSEDiff's and PiSA-SR's Real-ESRGAN degradation compresses with basicsr's ``DiffJPEG(differentiable=False)``
(cswry/OSEDiff dataloaders/realesrgan.py:14,85,229; csslc/PiSA-SR@9c76e12 src/datasets/realesrgan.py:14,85,229).
This is that codec as basicsr 1.4.2 writes it (the PyPI release their requirements.txt install; XPixelGroup/BasicSR
v1.4.2 = 651835a basicsr/utils/diffjpeg.py, cited by line below), which differs from a JPEG file (``osediff_lab.data.jpeg``) in five ways:
- the image is zero-padded (black) at the bottom and right to multiples of 16 (:480-486), not edge-replicated;
- no 8-bit rounding anywhere: not of YCbCr (:69), of the chroma averages (:91-92) nor of the decoded RGB (:442-443);
- continuous quality tables: base * f with f = 50 / q below quality 50 and 2 - q / 50 from 50 on (:41-45, :172),
  neither rounded nor clipped to [1, 255];
- the luma table is the Annex K table transposed (:14-18): coefficient (u, v), u the vertical frequency, is divided
  by the standard entry (v, u) (the chroma table's transpose, :22, is the same table: it is symmetric);
- chroma upsampled by repeating each sample 2 x 2 (nearest neighbour, :366-371), not by triangle filtering.
Quality 100 gives f = 0, where the release divides by zero (NaN); here that limit keeps every coefficient.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from osediff_lab.data.jpeg import CHROMA_TABLE, LUMA_TABLE, constants, from_blocks, to_blocks
from osediff_lab.dtypes import host_to_device

MCU = 16  # padding multiple (one 4:2:0 MCU)


def release_factors(quality: torch.Tensor) -> torch.Tensor:
    """basicsr's ``quality_to_factor`` (diffjpeg.py:32-45) on qualities (B,) in (0, 100]: (5000 / q or 200 - 2 q) / 100,
    in float32 as the release's quality tensor is."""
    q = quality.float()
    return torch.where(q < 50, 5000 / q, 200 - 2 * q) / 100


def release_tables(quality: torch.Tensor) -> torch.Tensor:
    """The release's quantisation tables (B, 2, 8, 8) (luma, chroma), indexed [vertical, horizontal frequency]:
    the Annex K tables transposed, times the continuous factor of each sample's quality."""
    base = torch.tensor((LUMA_TABLE, CHROMA_TABLE), dtype=torch.float32).view(2, 8, 8).transpose(-1, -2)
    return base[None] * release_factors(quality).cpu()[:, None, None, None]


def quantize_blocks_unrounded(samples: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """Samples (B, C, H, W) on the 0-255 scale through level shift, FDCT, rounding to multiples of ``tables``
    (B, 8, 8) and the IDCT, without clipping or rounding the result; a zero table entry keeps its coefficient."""
    basis = constants(samples.device).dct
    blocks = to_blocks(samples - 128)
    q = tables.reshape(-1, 1, 1, 1, 64)
    coeffs = (blocks.reshape(-1, 64) @ basis.T).view(blocks.shape)
    coeffs = torch.where(q > 0, (coeffs / q).round() * q, coeffs)
    decoded = (coeffs.view(-1, 64) @ basis).view(blocks.shape)
    return from_blocks(decoded) + 128


@torch.no_grad()
def release_jpeg(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) in [0, 1] through the release's DiffJPEG at ``quality`` (B,) -> (B, 3, H, W) in [0, 1], not
    rounded to 8 bits."""
    h, w = x.shape[-2:]
    k = constants(x.device)
    tables = host_to_device(release_tables(quality), x.device)
    rgb = F.pad(x.float(), (0, -w % MCU, 0, -h % MCU))  # zeros
    ycc = F.conv2d(rgb, k.to_ycc, k.ycc_bias)
    y = quantize_blocks_unrounded(ycc[:, :1], tables[:, 0])
    chroma = quantize_blocks_unrounded(F.avg_pool2d(ycc[:, 1:], 2), tables[:, 1])
    chroma = chroma.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    out = F.conv2d(torch.cat([y, chroma], dim=1), k.to_rgb, k.rgb_bias)
    return (out[..., :h, :w].clamp(0, 255) / 255).to(x.dtype)
