"""The one image loader of every command (train, evaluate, infer, data preview, prompts precompute).

Rules, the same everywhere (the README repeats them):

- listing a folder takes every file with a suffix Pillow reads (``image_extensions``); the content decides;
- refused from the header, before decoding: an empty file, a side of 0, more than ``MAX_PIXELS`` pixels
  (decompression-bomb guard);
- decoding is complete: a truncated or damaged file fails, it never yields a partial image;
- the EXIF orientation tag is applied: images (and ``image_size``) are upright, as a viewer shows them;
- grey, palette, CMYK, YCbCr, LAB become RGB; alpha (RGBA, LA, PA, palette transparency) is dropped, not
  composited;
- 16-bit files: ``load_image01`` keeps every bit (metrics); ``load_rgb`` scales them to 8 bit (training,
  inference); 32-bit integer and float greys are scaled by their range (``_peak``).

Every failure is an ``UnreadableImage`` whose message is ``"<path>: <reason>"``.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import torch
from PIL import ExifTags, Image, ImageFile

MAX_PIXELS = 12_000 * 12_000  # below Pillow's own bomb error (2 x Image.MAX_IMAGE_PIXELS), so ours decides

# EXIF orientation -> the numpy operation that makes an (H, W, C) array upright (as PIL's exif_transpose).
ORIENT: dict[int, Callable[[np.ndarray], np.ndarray]] = {
    2: lambda a: a[:, ::-1],
    3: lambda a: a[::-1, ::-1],
    4: lambda a: a[::-1],
    5: lambda a: a.swapaxes(0, 1),
    6: lambda a: np.rot90(a, -1),
    7: lambda a: np.rot90(a, 2).swapaxes(0, 1),
    8: lambda a: np.rot90(a, 1),
}


class UnreadableImage(OSError):
    """An image file that cannot be used; ``path`` and ``reason`` are kept for reports."""

    def __init__(self, path: str | Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = str(path)
        self.reason = reason


@functools.lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Every file suffix Pillow has a reader for (.png, .jpg, .webp, .tif, .bmp, .ppm, .tga, ...)."""
    Image.init()
    return frozenset(ext.lower() for ext, fmt in Image.registered_extensions().items() if fmt in Image.OPEN)


def list_images(root: str | Path) -> list[Path]:
    """Every file under ``root`` (recursive) with an image suffix, sorted for reproducibility."""
    extensions = image_extensions()
    return sorted(p for p in Path(root).rglob("*") if p.suffix.lower() in extensions and p.is_file())


def _reason(exc: BaseException) -> str:
    """A short, user-facing reason for a failed open or decode."""
    if isinstance(exc, FileNotFoundError):
        return "file not found (deleted or moved after it was listed?)"
    if isinstance(exc, Image.UnidentifiedImageError):
        return "not an image Pillow can read (wrong suffix, or damaged header)"
    if isinstance(exc, Image.DecompressionBombError):
        return f"more than {MAX_PIXELS:,} pixels (decompression-bomb guard)"
    return f"{type(exc).__name__}: {exc}"


def orientation(im: Image.Image) -> int:
    """The EXIF orientation (1-8) of an opened image; 1 when absent or invalid."""
    value = im.getexif().get(ExifTags.Base.Orientation, 1)
    return value if value in ORIENT else 1


@contextmanager
def open_image(path: str | Path) -> Iterator[Image.Image]:
    """An opened (not yet decoded) image whose header passed the size rules; any failure is UnreadableImage."""
    ImageFile.LOAD_TRUNCATED_IMAGES = False
    try:
        if os.stat(path).st_size == 0:
            raise UnreadableImage(path, "empty file (0 bytes)")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our MAX_PIXELS decides
            with Image.open(path) as im:
                w, h = im.size
                if w < 1 or h < 1:
                    raise UnreadableImage(path, f"has a side of 0 pixels ({w}x{h})")
                if w * h > MAX_PIXELS:
                    raise UnreadableImage(path, f"{w}x{h} is more than {MAX_PIXELS:,} pixels (decompression-bomb guard)")
                yield im
    except UnreadableImage:
        raise
    except Exception as exc:
        raise UnreadableImage(path, _reason(exc)) from exc


def image_size(path: str | Path) -> tuple[int, int]:
    """Upright (width, height) from the header only, without decoding pixels."""
    with open_image(path) as im:
        w, h = im.size
        return (h, w) if orientation(im) in (5, 6, 7, 8) else (w, h)


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


def _upright_rgb(path: str | Path, im: Image.Image) -> Image.Image:
    """Decode an opened image completely, convert it to 8-bit RGB and apply its EXIF orientation."""
    try:
        im.load()
        rgb, turn = to_rgb(im), orientation(im)
    except Exception as exc:
        raise UnreadableImage(path, _reason(exc)) from exc
    return rgb if turn == 1 else Image.fromarray(np.ascontiguousarray(ORIENT[turn](np.asarray(rgb))))


def load_rgb(path: str | Path) -> Image.Image:
    """The upright 8-bit RGB image of a file (the module rules); UnreadableImage otherwise."""
    with open_image(path) as im:
        return _upright_rgb(path, im)


def is_16bit(im: Image.Image) -> bool:
    """True when Pillow's decoder would read 16 bits per sample (I;16 greys, RGB;16 PNG/TIFF)."""
    if im.mode.startswith("I;16"):
        return True
    for tile in im.tile:
        raw = tile.args[0] if isinstance(tile.args, tuple) else tile.args
        if isinstance(raw, str) and ";16" in raw:
            return True
    return False


def _read_16bit(path: str | Path, im: Image.Image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 1] from a 16-bit file, as stored (orientation not applied)."""
    if im.mode.startswith("I;16"):
        grey = np.asarray(im, dtype=np.float64) / 65535.0
        return np.repeat(grey[..., None], 3, axis=2)
    import cv2

    arr = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)  # UNCHANGED: OpenCV applies no EXIF orientation
    if arr is None or arr.dtype != np.uint16:
        raise UnreadableImage(path, f"16-bit {im.format} that OpenCV cannot decode at 16 bit")
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr[..., 2::-1].astype(np.float64) / 65535.0  # BGR(A) -> RGB, alpha dropped


def load_image01(path: str | Path) -> torch.Tensor:
    """The upright image as float32 (3, H, W) in [0, 1]; 16-bit files keep their precision (the module rules).

    8-bit files decode exactly as pyiqa's own reader does (PIL -> RGB -> /255), so scores equal pyiqa's.
    """
    with open_image(path) as im:
        if not is_16bit(im):
            return pil_to_tensor(_upright_rgb(path, im))
        turn, arr = orientation(im), _read_16bit(path, im)  # failures become UnreadableImage in open_image
    if turn != 1:
        arr = ORIENT[turn](arr)
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1))).float()


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """8-bit RGB PIL image -> float tensor (3, H, W) in [0, 1]."""
    arr = np.asarray(im, dtype=np.uint8)
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).float() / 255.0


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3, H, W) in [0, 1] -> 8-bit RGB PIL image (rounded)."""
    arr = (x.detach().float().cpu().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    return Image.fromarray(np.ascontiguousarray(arr), mode="RGB")
