"""LightningDataModule: resolves the configured image source and serves HQ crops.

Source kinds (``data.kind``): ``demo`` (scikit-image photos), ``folder`` (any tree; lsdir and div2k are
folders), ``ffhq`` (the first ``first_n`` images by name), ``mix`` (several sources, each repeated
``repeat`` times: lsdir_ffhq), ``txt_list`` (text files listing image paths, each with a repeat count).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from osediff_lab.data.datasets import HQCropDataset
from osediff_lab.data.demo_images import demo_files
from osediff_lab.data.images import list_images
from osediff_lab.data.loader import WatchedDataLoader
from osediff_lab.data.paired import PairedImageDataset, paired_dataset
from osediff_lab.data.sampling import ResumableRandomSampler, ShardSampler
from osediff_lab.errors import ConfigError
from osediff_lab.paths import resolve_dir

log = logging.getLogger(__name__)
HINT = "To try the framework without a dataset use model=tiny data=demo."


def resolve_root(cfg: DictConfig, key: str = "data") -> Path:
    """The dataset root from ``<key>.root`` (or its environment variable), checked to exist."""
    env = cfg.get("root_env")
    hint = f" or the environment variable {env}" if env else ""
    name = cfg.get("name") or key.rsplit(".", 1)[-1]
    if not cfg.get("root"):
        raise ConfigError(f"data '{name}' has no root directory: set {key}.root=...{hint}. {HINT}")
    root = resolve_dir(cfg.root)
    if not root.is_dir():
        raise ConfigError(f"data '{name}': {key}.root={root} does not exist; set {key}.root=...{hint}. {HINT}")
    return root


def read_txt_list(path: str | Path, key: str) -> list[Path]:
    """Image paths listed one per line (blank lines and # comments ignored); relative ones are taken from the list's folder."""
    path = resolve_dir(path)
    if not path.is_file():
        raise ConfigError(f"{key}={path}: list file does not exist")
    files = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            p = Path(os.path.expanduser(line))
            files.append(p if p.is_absolute() else path.parent / p)
    if not files:
        raise ConfigError(f"{key}={path}: the list names no images")
    return files


def _folder_files(cfg: DictConfig, key: str) -> list[Path]:
    root = resolve_root(cfg, key)
    files = list_images(root)
    if not files:
        raise ConfigError(f"data '{cfg.get('name', key)}': no images under {key}.root={root}")
    if cfg.kind == "ffhq":
        n = int(cfg.first_n)
        if len(files) < n:
            log.warning("%s: only %d images under %s, fewer than first_n=%d", key, len(files), root, n)
        files = files[:n]
    return files


def _repeat(files: list[Path], repeat, key: str) -> list[Path]:
    if int(repeat) < 1:
        raise ConfigError(f"{key}.repeat={repeat} must be >= 1")
    return files * int(repeat)


def source_files(cfg: DictConfig, key: str = "data") -> list[Path]:
    """Image paths for the configured source kind (with repeats; duplicates weight a source)."""
    if cfg.kind == "demo":
        return demo_files(list(cfg.images))
    if cfg.kind in ("folder", "ffhq"):
        return _folder_files(cfg, key)
    if cfg.kind == "mix":
        if not cfg.get("sources"):
            raise ConfigError(f"{key}.sources is empty: name at least one source")
        files = []
        for name, src in cfg.sources.items():
            k = f"{key}.sources.{name}"
            part = _repeat(source_files(src, k), src.get("repeat", 1), k)
            log.info("%s: %d entries", k, len(part))
            files += part
        return files
    if cfg.kind == "txt_list":
        if not cfg.get("lists"):
            raise ConfigError(f"{key}.lists is empty: set {key}.lists='[{{path: a.txt, repeat: 1}}]'")
        files = []
        for i, entry in enumerate(cfg.lists):
            k = f"{key}.lists[{i}]"
            files += _repeat(read_txt_list(entry.path, f"{k}.path"), entry.get("repeat", 1), k)
        return files
    raise ConfigError(f"{key}.kind '{cfg.kind}' is unknown (demo, folder, ffhq, mix, txt_list)")


def data_problems(cfg: DictConfig) -> list[str]:
    """Missing roots, list files and benchmark folders of ``cfg.data`` and ``cfg.val``, each naming its key."""
    problems = []
    data = cfg.data
    sources = data.sources.items() if data.kind == "mix" and data.get("sources") else [("", data)]
    for name, src in sources:
        key = f"data.sources.{name}" if name else "data"
        if src.kind in ("folder", "ffhq"):
            try:
                resolve_root(src, key)
            except ConfigError as exc:
                problems.append(str(exc))
    if data.kind == "txt_list":
        try:
            source_files(data)
        except ConfigError as exc:
            problems.append(str(exc))
    val = cfg.get("val")
    if val is not None and val.get("name", "none") != "none" and val.get("kind") != "demo":
        for key in ("lr_dir", "hr_dir"):
            where = resolve_dir(val[key]) if val.get(key) else None
            if where is None or not where.is_dir():
                problems.append(f"val '{val.name}': val.{key}={where} does not exist; set val.{key}=... or val=none")
    return problems


class HQDataModule(pl.LightningDataModule):
    """Training crops from ``cfg`` (the data group); degradation happens later, on device.

    With ``seed`` the loader uses ``ResumableRandomSampler`` (seeded per-epoch order, sharded over the
    trainer's ranks itself, so the trainer needs ``use_distributed_sampler=False``) and per-sample seeded
    crops; ``self.sampler`` is what a resume tells to skip. Without it: plain shuffling, with workers
    seeded by Lightning (``seed_everything(workers=True)``).
    """

    def __init__(self, cfg: DictConfig, seed: int | None = None, val: DictConfig | None = None, scale: int = 4) -> None:
        super().__init__()
        self.cfg = cfg
        self.seed = seed
        self.val_cfg = val if val is not None and val.get("name", "none") != "none" else None
        self.scale = scale
        self.train_set: HQCropDataset | None = None
        self.sampler: ResumableRandomSampler | None = None
        self._resume: tuple[int, int] | None = None
        self.val_set: PairedImageDataset | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_set is None:
            c = self.cfg
            self.train_set = HQCropDataset(
                source_files(c), c.crop_size, c.flip, c.small_image_policy, c.get("repeat", 1), seed=self.seed
            )

    def resume_at(self, epoch: int, batches: int) -> None:
        """Restart mid-epoch: the next training loader begins after ``batches`` batches of ``epoch``."""
        if self.seed is None:
            raise RuntimeError("exact mid-epoch resume needs HQDataModule(seed=...) (the resumable sampler)")
        self._resume = (epoch, batches)

    def train_dataloader(self) -> WatchedDataLoader:
        workers = int(self.cfg.num_workers)
        extra = {"prefetch_factor": int(self.cfg.prefetch_factor)} if workers > 0 and self.cfg.get("prefetch_factor") else {}
        if self.seed is not None and self.sampler is None:
            trainer = self.trainer
            rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
            self.sampler = ResumableRandomSampler(len(self.train_set), self.seed, rank, world)
            if self._resume is not None:
                epoch, batches = self._resume
                done = batches * int(self.cfg.batch_size)
                if done >= self.sampler.per_rank():
                    epoch, done = epoch + 1, 0
                self.sampler.set_epoch(epoch)
                self.sampler.skip_next(done)
        return WatchedDataLoader(
            self.train_set,
            batch_size=self.cfg.batch_size,
            shuffle=self.sampler is None,
            sampler=self.sampler,
            drop_last=True,
            num_workers=workers,
            pin_memory=bool(self.cfg.get("pin_memory", False)) and torch.cuda.is_available(),
            persistent_workers=workers > 0 and bool(self.cfg.get("persistent_workers", True)),
            timeout=float(self.cfg.get("worker_timeout_s", 0)) if workers > 0 else 0,
            **extra,
        )

    def val_dataloader(self) -> WatchedDataLoader | list:
        """This rank's share of the paired benchmark of ``val`` (file-name order), or none when validation is off."""
        if self.val_cfg is None:
            return []
        if self.val_set is None:
            self.val_set = paired_dataset(self.val_cfg, self.scale)
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        return WatchedDataLoader(
            self.val_set,
            batch_size=int(self.val_cfg.batch_size),
            sampler=ShardSampler(len(self.val_set), rank, world),  # each rank scores its own share
            num_workers=int(self.cfg.num_workers),
        )
