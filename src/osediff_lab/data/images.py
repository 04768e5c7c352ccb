"""Reading images robustly: any mode Pillow opens becomes 8-bit RGB, or a clear UnreadableImage."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageFile

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff", ".gif", ".ppm"}


class UnreadableImage(OSError):
    """An image file that cannot be decoded; the message names the path and the reason."""


def list_images(root: str | Path) -> list[Path]:
    """Every image file under ``root`` (recursive), sorted for reproducibility."""
    root = Path(root)
    return sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file())


def image_size(path: str | Path) -> tuple[int, int]:
    """(width, height) from the header only, without decoding pixels."""
    try:
        with Image.open(path) as im:
            return im.size
    except Exception as exc:
        raise UnreadableImage(f"{path}: {exc}") from exc


def _peak(im: Image.Image, arr: np.ndarray) -> float:
    """Full-scale value of a high-bit-depth grayscale image: 16-bit modes are 65535; 32-bit ints and floats
    are read as 16-bit, 8-bit or [0, 1] data by their largest value."""
    if im.mode.startswith("I;16"):
        return 65535.0
    top = float(arr.max()) if arr.size else 0.0
    if im.mode == "F" and top <= 1.0:
        return 1.0
    return 65535.0 if top > 255 else 255.0


def to_rgb(im: Image.Image) -> Image.Image:
    """Convert grayscale, palette, RGBA/LA (alpha dropped), CMYK and 16-bit/32-bit images to 8-bit RGB."""
    if im.mode.startswith("I") or im.mode == "F":
        arr = np.asarray(im, dtype=np.float64)
        im = Image.fromarray(np.round(arr / _peak(im, arr) * 255).clip(0, 255).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA")
    return im.convert("RGB")


def load_rgb(path: str | Path) -> Image.Image:
    """Decode fully (truncated files fail here, not later) and return an 8-bit RGB image."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb(im)
    except Exception as exc:
        raise UnreadableImage(f"{path}: {type(exc).__name__}: {exc}") from exc


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB PIL image (rounded)."""
    arr = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
