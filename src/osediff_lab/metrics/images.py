"""Reading images for metrics as float RGB in [0, 1] without losing 16-bit precision.

8-bit files decode exactly as pyiqa's own reader does (PIL -> RGB -> /255), so our scores equal pyiqa's on
the same file. 16-bit PNG/TIFF (RGB or grey) are divided by 65535 directly, never rounded through 8 bit.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from osediff_lab.data.images import UnreadableImage, pil_to_tensor, to_rgb


def is_16bit(im: Image.Image) -> bool:
    """True when Pillow's decoder would read 16 bits per sample (I;16 greys, RGB;16 PNG/TIFF)."""
    if im.mode.startswith("I;16"):
        return True
    for tile in im.tile:
        raw = tile.args[0] if isinstance(tile.args, tuple) else tile.args
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _read_16bit(path: Path, im: Image.Image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a 16-bit file."""
    if im.mode.startswith("I;16"):
        grey = np.asarray(im, dtype=np.float64) / 65535.0
        return np.repeat(grey[..., None], 3, axis=2)
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    if arr is None or arr.dtype != np.uint16:
        raise UnreadableImage(f"{path}: 16-bit {im.format} that OpenCV cannot decode at 16 bit")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr[..., 2::-1].astype(np.float64) / 65535.0  # BGR(A) -> RGB, alpha dropped


def load_image01(path: str | Path) -> torch.Tensor:
    """Any Pillow-readable image -> float32 tensor (3, H, W) in [0, 1]; 16-bit files keep their precision."""
    path = Path(path)
    try:
        with Image.open(path) as im:
            if is_16bit(im):
                return torch.from_numpy(np.ascontiguousarray(_read_16bit(path, im).transpose(2, 0, 1))).float()
            im.load()
            rgb = to_rgb(im)
    except UnreadableImage:
        raise
    except Exception as exc:
        raise UnreadableImage(f"{path}: {type(exc).__name__}: {exc}") from exc
    return pil_to_tensor(rgb)


def center_crop(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The centred (height, width) window of a (C, H, W) image (any value range)."""
    h, w = img.shape[-2:]
    top, left = (h - height) // 2, (w - width) // 2
    return img[..., top : top + height, left : left + width]
