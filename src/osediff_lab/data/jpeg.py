"""Baseline JPEG (ITU-T T.81) compression and decompression in torch, batched, one quality per sample: the
image an 8-bit JPEG file of it would decode to, without the (lossless) entropy coding.

As libjpeg does with its defaults: JFIF full-range YCbCr in 8-bit samples, 4:2:0 chroma by 2x2 box averaging,
the Annex K tables scaled by IJG quality (an integer quality gives libjpeg's tables exactly), exact rounding of
the DCT coefficients, triangle ("fancy") chroma upsampling, edges replicated to whole 16x16 MCUs. Not
differentiable (the degradation runs without gradients).
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from osediff_lab.dtypes import host_to_device

# Annex K.1 (luminance) and K.2 (chrominance) quantization tables, in natural (row-major) order.
LUMA_TABLE = (
    16, 11, 10, 16, 24, 40, 51, 61,
    12, 12, 14, 19, 26, 58, 60, 55,
    14, 13, 16, 24, 40, 57, 69, 56,
    14, 17, 22, 29, 51, 87, 80, 62,
    18, 22, 37, 56, 68, 109, 103, 77,
    24, 35, 55, 64, 81, 104, 113, 92,
    49, 64, 78, 87, 103, 121, 120, 101,
    72, 92, 95, 98, 112, 100, 103, 99,
)  # fmt: skip
CHROMA_TABLE = (
    17, 18, 24, 47, 99, 99, 99, 99,
    18, 21, 26, 66, 99, 99, 99, 99,
    24, 26, 56, 99, 99, 99, 99, 99,
    47, 66, 99, 99, 99, 99, 99, 99,
    *([99] * 32),
)  # fmt: skip
# JFIF's RGB -> YCbCr (rows: Y, Cb, Cr; Cb and Cr then offset by 128) and its inverse.
RGB_TO_YCC = ((0.299, 0.587, 0.114), (-0.168736, -0.331264, 0.5), (0.5, -0.418688, -0.081312))
YCC_TO_RGB = ((1.0, 0.0, 1.402), (1.0, -0.344136, -0.714136), (1.0, 1.772, 0.0))


def quantization_tables(quality: torch.Tensor) -> torch.Tensor:
    """IJG-scaled tables (B, 2, 8, 8) (luma, chroma) for qualities (B,) in (0, 100]: (base * s + 50) / 100
    rounded down, clipped to [1, 255], with the percentage s = 5000 / q below 50 and 200 - 2 q from 50 on,
    rounded down (libjpeg's integer arithmetic, which fractional qualities extend)."""
    q = quality.double().clamp(min=1e-3)
    scale = torch.floor(torch.where(q < 50, 5000 / q, 200 - 2 * q))
    base = torch.tensor((LUMA_TABLE, CHROMA_TABLE), dtype=torch.float64, device=q.device).view(1, 2, 8, 8)
    return torch.floor((base * scale[:, None, None, None] + 50) / 100).clamp(1, 255).float()


def dct_matrix() -> torch.Tensor:
    """The orthonormal 8-point DCT-II matrix D (u, x): JPEG's FDCT of a block f is D f D^T, its IDCT D^T F D."""
    u, x = torch.arange(8, dtype=torch.float64)[:, None], torch.arange(8, dtype=torch.float64)[None]
    d = torch.cos((2 * x + 1) * u * math.pi / 16) * 0.5
    d[0] /= math.sqrt(2)
    return d


class Constants(NamedTuple):
    """The codec's fixed matrices on one device: the 2-D DCT of a row-major block as a 64 x 64 matrix (uv, xy),
    and the colour conversions as 1x1 convolutions (weight, bias): RGB in [0, 1] -> YCbCr in [0, 255] (Cb, Cr
    offset by 128), and back to RGB in [0, 255]."""

    dct: torch.Tensor
    to_ycc: torch.Tensor
    ycc_bias: torch.Tensor
    to_rgb: torch.Tensor
    rgb_bias: torch.Tensor


@functools.cache
def constants(device: torch.device) -> Constants:
    """``Constants`` on ``device``, made once per device (a tensor built from host data on a GPU waits for it)."""
    d = dct_matrix()
    to_ycc, to_rgb = torch.tensor(RGB_TO_YCC, dtype=torch.float64), torch.tensor(YCC_TO_RGB, dtype=torch.float64)
    offset = torch.tensor((0.0, 128.0, 128.0), dtype=torch.float64)
    mats = (torch.kron(d, d), 255 * to_ycc[:, :, None, None], offset, to_rgb[:, :, None, None], -to_rgb @ offset)
    return Constants(*(m.float().to(device) for m in mats))


def to_blocks(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) with H, W multiples of 8 -> (B, C, H/8, W/8, 64) 8x8 blocks, row-major inside a block."""
    b, c, h, w = x.shape
    return x.view(b, c, h // 8, 8, w // 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, c, h // 8, w // 8, 64)


def from_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """``to_blocks`` undone."""
    b, c, hb, wb, _ = blocks.shape
    return blocks.view(b, c, hb, wb, 8, 8).permute(0, 1, 2, 4, 3, 5).reshape(b, c, hb * 8, wb * 8)


def quantize_blocks(samples: torch.Tensor, tables: torch.Tensor) -> torch.Tensor:
    """8-bit samples (B, C, H, W) through level shift, FDCT, rounding to multiples of ``tables`` (B, 8, 8),
    and back through the IDCT: the decoded samples, clipped to [0, 255] and rounded as a decoder does."""
    basis = constants(samples.device).dct
    blocks = to_blocks(samples - 128)
    q = tables.reshape(-1, 1, 1, 1, 64)
    coeffs = (blocks.reshape(-1, 64) @ basis.T).view(blocks.shape).div_(q).round_().mul_(q)
    decoded = (coeffs.view(-1, 64) @ basis).view(blocks.shape)
    return from_blocks(decoded).add_(128).clamp_(0, 255).round_()


@torch.no_grad()
def jpeg_compress(x: torch.Tensor, quality: torch.Tensor) -> torch.Tensor:
    """x (B, 3, H, W) in [0, 1] JPEG-compressed at ``quality`` (B,) in (0, 100] and decoded: 8-bit levels in [0, 1]."""
    h, w = x.shape[-2:]
    k = constants(x.device)
    tables = host_to_device(quantization_tables(quality), x.device)
    ph, pw = -h % 16, -w % 16
    rgb = x.float().clamp(0, 1)
    if ph or pw:
        rgb = F.pad(rgb, (0, pw, 0, ph), mode="replicate")
    ycc = F.conv2d(rgb, k.to_ycc, k.ycc_bias).clamp_(0, 255).round_()
    y = quantize_blocks(ycc[:, :1], tables[:, 0])
    c = ycc[:, 1:]
    chroma = quantize_blocks(((c[..., ::2, ::2] + c[..., 1::2, ::2] + c[..., ::2, 1::2] + c[..., 1::2, 1::2]) / 4).round_(),
                             tables[:, 1])
    chroma = F.interpolate(chroma, scale_factor=2, mode="bilinear", align_corners=False)
    out = F.conv2d(torch.cat([y, chroma], dim=1), k.to_rgb, k.rgb_bias)
    return out[..., :h, :w].clamp(0, 255).round_().div_(255).to(x.dtype)
