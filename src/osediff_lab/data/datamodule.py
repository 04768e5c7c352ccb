"""LightningDataModule: builds the configured image source (``data._target_``, see ``sources``) and serves HQ crops."""

from __future__ import annotations

import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from osediff_lab.data.datasets import HQCropDataset
from osediff_lab.data.loader import WatchedDataLoader
from osediff_lab.data.paired import PairedImageDataset, paired_dataset
from osediff_lab.data.sampling import ResumableRandomSampler, ShardSampler
from osediff_lab.data.sources import source_files, source_problems
from osediff_lab.paths import resolve_dir


def data_problems(cfg: DictConfig) -> list[str]:
    """The data source's own problems (missing roots, list files, bad arguments) and the benchmark folders of
    ``cfg.val``, each naming its key."""
    problems = source_problems(cfg.data)
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
