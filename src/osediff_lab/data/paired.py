"""Paired LR/HR benchmarks (RealSR, DRealSR, DIV2K-Val layouts): files matched by name."""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig
from torch.utils.data import Dataset

from osediff_lab.data.images import image_size, list_images, load_rgb, pil_to_tensor
from osediff_lab.errors import ConfigError
from osediff_lab.paths import resolve_dir


def match_pairs(lr_dir: str | Path, hr_dir: str | Path, scale: int, limit: int | None = None) -> list[tuple[Path, Path]]:
    """(LR, HR) paths matched by file stem; a missing partner or an HR size != LR x scale is an error naming the file."""
    lr_dir, hr_dir = Path(lr_dir), Path(hr_dir)
    for key, d in (("lr_dir", lr_dir), ("hr_dir", hr_dir)):
        if not d.is_dir():
            raise ConfigError(f"paired benchmark: {key}={d} does not exist")
    lrs = {p.relative_to(lr_dir).with_suffix("").as_posix(): p for p in list_images(lr_dir)}
    hrs = {p.relative_to(hr_dir).with_suffix("").as_posix(): p for p in list_images(hr_dir)}
    only_lr, only_hr = sorted(set(lrs) - set(hrs)), sorted(set(hrs) - set(lrs))
    if only_lr or only_hr:
        which = [f"{lrs[k]} has no HR partner" for k in only_lr] + [f"{hrs[k]} has no LR partner" for k in only_hr]
        raise ConfigError("paired benchmark: " + "; ".join(which[:5]) + (f" (+{len(which) - 5} more)" if len(which) > 5 else ""))
    pairs = [(lrs[k], hrs[k]) for k in sorted(lrs)]
    if limit:
        pairs = pairs[:limit]
    for lr, hr in pairs:
        (lw, lh), (hw, hh) = image_size(lr), image_size(hr)
        if (hw, hh) != (lw * scale, lh * scale):
            raise ConfigError(f"paired benchmark: {hr} is {hw}x{hh} but its LR {lr} is {lw}x{lh} (scale {scale})")
    return pairs


class PairedImageDataset(Dataset):
    """Yields {"lq": (3, h, w) in [-1, 1], "hq": (3, h*s, w*s) in [-1, 1], "name": file stem}."""

    def __init__(self, lr_dir: str | Path, hr_dir: str | Path, scale: int, limit: int | None = None) -> None:
        self.pairs = match_pairs(lr_dir, hr_dir, scale, limit)
        self.scale = scale

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> dict:
        lr, hr = self.pairs[index]
        return {
            "lq": pil_to_tensor(load_rgb(lr)) * 2 - 1,
            "hq": pil_to_tensor(load_rgb(hr)) * 2 - 1,
            "name": lr.stem,
        }


def paired_dataset(val: DictConfig, scale: int) -> PairedImageDataset:
    """The paired benchmark named by a ``val`` config (LR/HR folders matched by name, optional ``limit``);
    ``kind: demo`` = held-out crops of scikit-image photographs (``osediff_lab.data.heldout``)."""
    if val.get("kind") == "demo":
        from osediff_lab.data.heldout import heldout_dataset

        return heldout_dataset(val, scale)
    return PairedImageDataset(resolve_dir(val.lr_dir), resolve_dir(val.hr_dir), scale, val.get("limit"))
