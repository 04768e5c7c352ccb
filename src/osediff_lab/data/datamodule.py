"""LightningDataModule: resolves the configured image source and serves HQ crops."""

from __future__ import annotations

import os
from pathlib import Path

import pytorch_lightning as pl
from omegaconf import DictConfig
from torch.utils.data import DataLoader

from osediff_lab.data.datasets import HQCropDataset
from osediff_lab.data.images import list_images
from osediff_lab.errors import ConfigError


def demo_files(names: list[str]) -> list[Path]:
    """Photographs that ship inside scikit-image (no download)."""
    import skimage

    root = Path(skimage.__file__).parent / "data"
    files = [root / n for n in names]
    missing = [str(f) for f in files if not f.is_file()]
    if missing:
        raise ConfigError(f"data.images: not found in scikit-image's bundled data: {missing}")
    return files


def resolve_root(cfg: DictConfig) -> Path:
    """The dataset root from ``data.root`` (or its environment variable), checked to exist."""
    env = cfg.get("root_env")
    hint = f" or the environment variable {env}" if env else ""
    if not cfg.get("root"):
        raise ConfigError(
            f"data '{cfg.name}' has no root directory: set data.root=...{hint}. "
            "To try the framework without a dataset use model=tiny data=demo."
        )
    root = Path(os.path.expanduser(str(cfg.root)))
    if not root.is_dir():
        raise ConfigError(
            f"data '{cfg.name}': data.root={root} does not exist; set data.root=...{hint}. "
            "To try the framework without a dataset use model=tiny data=demo."
        )
    return root


def source_files(cfg: DictConfig) -> list[Path]:
    """Image paths for the configured source kind."""
    if cfg.kind == "demo":
        return demo_files(list(cfg.images))
    if cfg.kind == "folder":
        root = resolve_root(cfg)
        files = list_images(root)
        if not files:
            raise ConfigError(f"data '{cfg.name}': no images under data.root={root}")
        return files
    raise ConfigError(f"data.kind '{cfg.kind}' is unknown (demo, folder)")


class HQDataModule(pl.LightningDataModule):
    """Training crops from ``cfg`` (the data group); degradation happens later, on device."""

    def __init__(self, cfg: DictConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.train_set: HQCropDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            c = self.cfg
            self.train_set = HQCropDataset(source_files(c), c.crop_size, c.flip, c.small_image_policy, c.get("repeat", 1))

    def train_dataloader(self) -> DataLoader:
        workers = int(self.cfg.num_workers)
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            shuffle=True,
            drop_last=True,
            num_workers=workers,
            pin_memory=bool(self.cfg.get("pin_memory", False)),
            persistent_workers=workers > 0,
        )
