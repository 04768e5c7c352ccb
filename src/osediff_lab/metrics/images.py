"""Cropping metric inputs; files are read by the one loader, ``osediff_lab.data.images.load_image01``."""

from __future__ import annotations

import torch


def center_crop(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centred (height, width) window of a (C, H, W) image (any value range)."""
    h, w = img.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return img[..., top : top + height, left : left + width]
