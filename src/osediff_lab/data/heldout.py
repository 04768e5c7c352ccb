"""Held-out validation crops: fixed tiles of a few images, LQ by bicubic downsampling (``val=demo``).

The demo's images ship with scikit-image; the ones named in ``val.images`` are not in ``data.images``,
so validation scores images the model (and the nano base it starts from) never saw.
"""

from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig
from torch.utils.data import Dataset

from osediff_lab.data.degradation import BicubicDegradation
from osediff_lab.data.images import load_rgb, pil_to_tensor
from osediff_lab.errors import ConfigError


def tile_corners(length: int, crop: int, count: int) -> list[int]:
    """``count`` evenly spaced start offsets of a ``crop``-long window inside ``length`` (ends included)."""
    if length < crop:
        raise ConfigError(f"val: an image side of {length} px is smaller than val.crop_size={crop}")
    if count == 1:
        return [(length - crop) // 2]
    return [round(i * (length - crop) / (count - 1)) for i in range(count)]


class HeldOutCrops(Dataset):
    """Yields {"lq": (3, c/s, c/s), "hq": (3, c, c), both in [-1, 1], "name"}: a ``grid`` x ``grid``
    of ``crop``-px tiles per image, evenly spread over it, LQ = bicubic (antialiased) downsampling by ``scale``."""

    def __init__(self, files: list[Path], crop: int, grid: int, scale: int, limit: int | None = None) -> None:
        if crop % scale:
            raise ConfigError(f"val.crop_size={crop} must be divisible by the scale {scale}")
        self.items: list[tuple[str, torch.Tensor]] = []
        for f in files:
            img = pil_to_tensor(load_rgb(f)) * 2 - 1
            h, w = img.shape[-2:]
            for i, top in enumerate(tile_corners(h, crop, grid)):
                for j, left in enumerate(tile_corners(w, crop, grid)):
                    self.items.append((f"{Path(f).stem}_{i}{j}", img[:, top : top + crop, left : left + crop].clone()))
        if limit:
            self.items = self.items[: int(limit)]
        self.down = BicubicDegradation(scale)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        name, hq = self.items[index]
        return {"lq": self.down(hq[None])[0], "hq": hq, "name": name}


def heldout_dataset(val: DictConfig, scale: int) -> HeldOutCrops:
    """The held-out crops a ``kind: demo`` val config names (scikit-image's bundled photographs)."""
    from osediff_lab.data.demo_images import demo_files

    return HeldOutCrops(demo_files(list(val.images)), int(val.crop_size), int(val.grid), scale, val.get("limit"))
